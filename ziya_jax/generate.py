"""python -m ziya_jax.generate --checkpoint CKPT [--image IMG ...] (--prompt TEXT | --input-ids 1,2,3) [flags]

Prints the answer to one prompt (Ziya format: `<human>:{prompt}\\n<bot>:`, images first). --input-ids gives raw
LLM token ids instead (for checkpoints without a tokenizer; image placeholders are put in front when the ids
hold none), and an image may be a .npy of already-normalised pixels, so runs compare exactly with other
implementations. --json also prints the generated token ids.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import numpy as np

from ziya_jax.chat import (add_decode_flags, decode_config, load_image, load_tokenizers, qformer_inputs,
                           tokenizer_dir)
from ziya_jax.decode import DecodeConfig, decode_params, generate


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} wants comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    parser.add_argument("--image", action="append", default=[], help="image file or .npy pixels; repeatable")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt")
    text.add_argument("--input-ids", help="raw LLM token ids, e.g. 1,2,3")
    parser.add_argument("--qformer-input-ids", help="raw Q-Former instruction ids (Chat models, with --input-ids)")
    parser.add_argument("--eos-token-id", type=int, help="with --input-ids (default: the model config's)")
    parser.add_argument("--json", action="store_true")
    add_decode_flags(parser, DecodeConfig())
    args = parser.parse_args(argv)
    from ziya_jax.checkpoint import load_model

    try:
        params, cfg = load_model(args.checkpoint)
        params = decode_params(params)  # the fast per-layer form; the stacked copy is dropped
        pixels = [load_image(p, cfg.vision.image_size) for p in args.image]
        dc = decode_config(args, DecodeConfig())
        qformer = {}
        tok = None
        if args.prompt is not None:
            from ziya_jax.data import formats

            tok, qtok = load_tokenizers(tokenizer_dir(args))
            ids = formats.encode_prompt([], formats.IMAGE * len(pixels) + args.prompt, tok, cfg.image_token_id,
                                        cfg.num_query_tokens)
            dc = dataclasses.replace(dc, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            qformer = qformer_inputs(cfg, qtok, args.prompt)
        else:
            ids = parse_ids(args.input_ids, "--input-ids")
            if pixels and cfg.image_token_id not in ids:
                ids = [cfg.image_token_id] * (cfg.num_query_tokens * len(pixels)) + ids
            eos = cfg.llm.eos_token_id if args.eos_token_id is None else args.eos_token_id
            dc = dataclasses.replace(dc, eos_token_id=eos, pad_token_id=cfg.llm.pad_token_id)
            if cfg.variant == "chat":
                if not args.qformer_input_ids:
                    raise ValueError("a Chat model with --input-ids also needs --qformer-input-ids")
                q = np.asarray([parse_ids(args.qformer_input_ids, "--qformer-input-ids")], np.int32)
                qformer = dict(qformer_ids=q, qformer_mask=np.ones_like(q))
        image_batch = np.stack(pixels)[None] if pixels else None
        tokens, lengths = generate(params, cfg, np.asarray([ids], np.int32), None, image_batch, dc=dc,
                                   rng=jax.random.key(args.seed), **qformer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    new = [int(t) for t in tokens[0, :lengths[0]]]
    answer = tok.decode([t for t in new if t != dc.eos_token_id]) if tok is not None else None
    if answer is not None:
        print(answer)
    if args.json:
        print(json.dumps({"answer": answer, "token_ids": new}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
