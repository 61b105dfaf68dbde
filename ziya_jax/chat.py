"""Multi-turn, multi-image chat in Ziya's prompt format, and its interactive CLI:

    python -m ziya_jax.chat --checkpoint CKPT [--tokenizer DIR] [decoding flags]

Type a question; `/image PATH` adds an image (it enters the conversation where it was given), `/reset` clears
the conversation, `/quit` (or end of input) leaves. Answers stream as they are decoded.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

from ziya_jax.data import errors, formats, images
from ziya_jax.data.tokenizers import QFormerTokenizer, SentencePieceTokenizer
from ziya_jax.decode import ZIYA_DEMO, DecodeConfig, decode_params, generate

QFORMER_TEXT_LEN = 128  # the Q-Former's instruction budget (InstructBLIP: max_txt_len 128)


def load_tokenizers(directory: str):
    """(LLM tokenizer, Q-Former tokenizer or None) from a folder holding `llm.model` or `tokenizer.model`
    (+ added_tokens.json), and optionally `qformer.model` (sentencepiece) or `vocab.txt` (BERT)."""
    llm = next((os.path.join(directory, n) for n in ("llm.model", "tokenizer.model")
                if os.path.isfile(os.path.join(directory, n))), None)
    if llm is None:
        raise FileNotFoundError(f"no llm.model or tokenizer.model in {directory}")
    qformer = None
    if os.path.isfile(os.path.join(directory, "qformer.model")):
        qformer = QFormerTokenizer.from_sentencepiece(os.path.join(directory, "qformer.model"))
    elif os.path.isfile(os.path.join(directory, "vocab.txt")):
        qformer = QFormerTokenizer.from_bert_vocab(os.path.join(directory, "vocab.txt"))
    return SentencePieceTokenizer.load(llm), qformer


def load_image(path: str, size: int) -> np.ndarray:
    """An image file -> CLIP-normalised [size, size, 3]; a .npy file is taken as already-normalised pixels
    ([3, H, W] or [H, W, 3], as HF pixel_values or ziya_jax's layout)."""
    if path.endswith(".npy"):
        pixels = np.load(path, allow_pickle=False).astype(np.float32)
        if pixels.ndim == 4 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.ndim == 3 and pixels.shape[0] == 3:
            pixels = pixels.transpose(1, 2, 0)
        if pixels.shape != (size, size, 3):
            raise ValueError(f"{path}: pixels of shape {pixels.shape}, the model wants ({size}, {size}, 3) or "
                             f"(3, {size}, {size})")
        return pixels
    try:
        return images.to_pixels(images.open_rgb(path), size)
    except errors.BadSample as e:
        raise ValueError(f"cannot read image {e}") from None


def qformer_inputs(cfg, qtok: QFormerTokenizer | None, instruction: str) -> dict:
    """For a Chat model, the instruction in Q-Former tokens (left-truncated), batch of one; {} for Base."""
    if cfg.variant != "chat":
        return {}
    require_qformer_tokenizer(cfg, qtok)
    q = formats.encode_qformer_text(instruction, qtok, QFORMER_TEXT_LEN)
    return dict(qformer_ids=q["ids"][None], qformer_mask=q["mask"][None])


def require_qformer_tokenizer(cfg, qtok):
    if cfg.variant == "chat" and qtok is None:
        raise ValueError("a Chat model needs the Q-Former tokenizer (qformer.model or vocab.txt)")


class ChatSession:
    """A conversation: finished turns, the images given so far, and where each entered."""

    def __init__(self, params, cfg, tok: SentencePieceTokenizer, qtok: QFormerTokenizer | None,
                 decode: DecodeConfig):
        require_qformer_tokenizer(cfg, qtok)
        self.params, self.cfg, self.tok, self.qtok = params, cfg, tok, qtok
        self.decode = dataclasses.replace(decode, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        self.reset()

    def reset(self):
        self.history: list[formats.Turn] = []
        self.images: list[np.ndarray] = []
        self.pending_images = 0  # given since the last question: they go before the next query

    def add_image(self, path: str):
        self.images.append(load_image(path, self.cfg.vision.image_size))
        self.pending_images += 1

    def ask(self, query: str, on_token=None, rng=None) -> str:
        """Answer `query` given everything so far; on_token(id) is called as each token is decoded."""
        full_query = formats.IMAGE * self.pending_images + query
        ids = np.asarray([formats.encode_prompt(self.history, full_query, self.tok, self.cfg.image_token_id,
                                                self.cfg.num_query_tokens)], np.int32)
        pixels = np.stack(self.images)[None] if self.images else None
        qformer = qformer_inputs(self.cfg, self.qtok, query)  # the instruction: the latest question
        tokens, lengths = generate(self.params, self.cfg, ids, None, pixels, dc=self.decode, rng=rng,
                                   on_token=on_token, **qformer)
        new = [int(t) for t in tokens[0, :lengths[0]] if t != self.tok.eos_id]
        answer = self.tok.decode(new)
        self.history.append(formats.Turn(full_query, answer))
        self.pending_images = 0
        return answer


def add_decode_flags(parser: argparse.ArgumentParser, default: DecodeConfig):
    parser.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens)
    parser.add_argument("--min-new-tokens", type=int, default=default.min_new_tokens)
    parser.add_argument("--num-beams", type=int, default=default.num_beams)
    parser.add_argument("--length-penalty", type=float, default=default.length_penalty)
    parser.add_argument("--greedy", action="store_true", help="no sampling (the default unless a sampling flag "
                                                             "is given, or the demo settings are)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, default=0)


def decode_config(args, default: DecodeConfig) -> DecodeConfig:
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                  ("top_k", args.top_k)) if v is not None}
    do_sample = bool(sampling) or (default.do_sample and not args.greedy and args.num_beams == 1)
    return DecodeConfig(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
        length_penalty=args.length_penalty, do_sample=do_sample,
        temperature=sampling.get("temperature", default.temperature if do_sample else 1.0),
        top_p=sampling.get("top_p", default.top_p if do_sample else 1.0),
        top_k=sampling.get("top_k", default.top_k if do_sample else 0),
        repetition_penalty=(args.repetition_penalty if args.repetition_penalty is not None
                            else default.repetition_penalty))


def tokenizer_dir(args) -> str:
    return args.tokenizer or os.path.join(args.checkpoint, "tokenizer")


def main(argv=None, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    add_decode_flags(parser, ZIYA_DEMO)
    args = parser.parse_args(argv)
    from ziya_jax.checkpoint import load_model

    try:
        params, cfg = load_model(args.checkpoint)
        params = decode_params(params)  # once for the session's many answers; the stacked copy is dropped
        tok, qtok = load_tokenizers(tokenizer_dir(args))
        session = ChatSession(params, cfg, tok, qtok, decode_config(args, ZIYA_DEMO))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = jax.random.key(args.seed)
    print("ziya_jax chat: /image PATH adds an image, /reset clears, /quit leaves.", file=stdout, flush=True)
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        try:
            if line.startswith("/image"):
                session.add_image(line[len("/image"):].strip())
                print(f"(image {len(session.images)} added)", file=stdout, flush=True)
                continue
            rng, key = jax.random.split(rng)
            streamed = StreamPrinter(tok, stdout)
            answer = session.ask(line, on_token=streamed, rng=key)
            streamed.finish(answer)
        except ValueError as e:
            print(f"error: {e}", file=stdout, flush=True)
    return 0


class StreamPrinter:
    """Prints the decoded text as tokens arrive (decoding the whole prefix, so multi-byte characters that
    span tokens come out whole)."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""

    def __call__(self, token: int):
        if token == self.tok.eos_id:
            return
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self, answer: str):
        self.out.write(answer[len(self.shown):] + "\n")
        self.out.flush()


if __name__ == "__main__":
    sys.exit(main())
