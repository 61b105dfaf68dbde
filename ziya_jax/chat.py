"""Multi-turn, multi-image chat in Ziya's prompt format, and its interactive CLI:

    python -m ziya_jax.chat --checkpoint CKPT [--tokenizer DIR] [--dtype bfloat16] [--mesh 1,-1,1]
                            [--quantize int8] [decoding flags]

Type a question; `/image PATH` adds an image (it enters the conversation where it was given), `/reset` clears
the conversation, `/quit` (or end of input) leaves. Answers stream as they are decoded.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys

import jax
import numpy as np

from ziya_jax import cli
from ziya_jax.data import formats, images
from ziya_jax.decode import ZIYA_DEMO, DecodeConfig, generate


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    dropped_turns: int = 0  # the oldest turns (and their images) left out so that the prompt fits
    dropped_images: int = 0


class ChatSession:
    """A conversation: finished turns, the images each question was given, in the prompt format training uses.
    Images given before the first question go before it (as training places images its text does not name);
    images given later enter as `<image>` at the start of the next question. When the conversation outgrows
    the model's context, the oldest turns and their images are dropped."""

    def __init__(self, params, cfg, tok, qtok, decode: DecodeConfig):
        if cfg.variant == "chat" and qtok is None:
            raise ValueError("a Chat model needs the Q-Former tokenizer (qformer.model or vocab.txt)")
        self.params, self.cfg, self.tok, self.qtok = params, cfg, tok, qtok
        self.decode = dataclasses.replace(decode, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        self.reset()

    def reset(self):
        self.turns: list[formats.Turn] = []
        self.turn_images: list[list[np.ndarray]] = []  # the images given before each turn's question
        self.pending: list[np.ndarray] = []  # given since the last question

    def add_image(self, path: str):
        self.pending.append(images.load_image(path, self.cfg.vision.image_size))

    def _placed(self, query: str) -> str:
        return (formats.IMAGE * len(self.pending) if self.turns else "") + query

    def model_input(self, query: str) -> tuple[dict[str, np.ndarray], list[np.ndarray], int]:
        """(the model's input for `query`, its images, oldest turns dropped to fit); see the class docstring."""
        turns = [*self.turns, formats.Turn(self._placed(query), None)]
        per_turn = [*self.turn_images, self.pending]
        for dropped in range(len(turns)):
            pics = [im for group in per_turn[dropped:] for im in group]
            try:
                arrays = formats.prompt_input(
                    turns[dropped:], len(pics), self.tok, self.qtok, self.cfg, self.decode.max_new_tokens
                )
                return arrays, pics, dropped
            except formats.PromptTooLong:
                if dropped == len(turns) - 1:
                    self.pending = []  # a question that cannot fit must not keep failing with the same images
                    raise
        raise AssertionError("unreachable")

    def ask(self, query: str, on_token=None, rng=None) -> Answer:
        """Answer `query` given everything so far; on_token(id) is called as each token is decoded."""
        arrays, pics, dropped = self.model_input(query)
        pixels = np.stack(pics)[None] if pics else None
        batch = {k: v[None] for k, v in arrays.items() if k != "attention_mask"}
        tokens, lengths = generate(
            self.params, self.cfg, dc=self.decode, rng=rng, on_token=on_token, pixel_values=pixels, **batch
        )
        text = self.tok.decode([int(t) for t in tokens[0, : lengths[0]] if t != self.tok.eos_id])
        dropped_images = sum(map(len, self.turn_images[:dropped]))
        self.turns, self.turn_images = self.turns[dropped:], self.turn_images[dropped:]
        if text.strip():  # a blank answer is not kept: a prompt cannot hold an empty turn; its images stay pending
            self.turns.append(formats.Turn(self._placed(query), text))
            self.turn_images.append(self.pending)
            self.pending = []
        return Answer(text, dropped, dropped_images)


def main(argv=None, stdin=None, stdout=None) -> int:
    stdin = stdin or io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    stdout = stdout or sys.stdout
    parser = argparse.ArgumentParser(
        prog="python -m ziya_jax.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_flags(parser)
    cli.add_decode_flags(parser, ZIYA_DEMO)
    args = parser.parse_args(argv)
    try:
        model = cli.load(args)
        session = ChatSession(model.params, model.cfg, model.tok, model.qtok, cli.decode_config(args, ZIYA_DEMO))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = jax.random.key(args.seed)
    print("ziya_jax chat: /image PATH adds an image, /reset clears, /quit leaves.", file=stdout, flush=True)
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        if "\ufffd" in line:
            print(
                "error: that line is not valid UTF-8; it was not sent (the conversation is kept)",
                file=stdout,
                flush=True,
            )
            continue
        if line == "/quit":
            break
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        try:
            if line.startswith("/image"):
                session.add_image(line[len("/image") :].strip())
                print(
                    f"(image {sum(map(len, session.turn_images)) + len(session.pending)} added)",
                    file=stdout,
                    flush=True,
                )
                continue
            rng, key = jax.random.split(rng)
            streamed = StreamPrinter(model.tok, stdout)
            answer = session.ask(line, on_token=streamed, rng=key)
            streamed.finish(answer.text)
            if answer.dropped_turns:
                print(
                    f"(the conversation outgrew the model's context: its oldest {answer.dropped_turns} turn(s) "
                    f"and {answer.dropped_images} image(s) were left out)",
                    file=stdout,
                    flush=True,
                )
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
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text

    def finish(self, answer: str):
        self.out.write(answer[len(self.shown) :] + "\n")
        self.out.flush()


if __name__ == "__main__":
    sys.exit(main())
