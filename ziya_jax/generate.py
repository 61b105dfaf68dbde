"""python -m ziya_jax.generate --checkpoint CKPT [--image IMG ...] (--prompt TEXT | --input-ids 1,2,3) [flags]

Prints the answer to one prompt, built as training builds it (Ziya format: `<human>:{prompt}\\n<bot>:`, images
first unless the prompt places them with `<image>`). --input-ids gives raw LLM token ids instead (for
checkpoints without a tokenizer; image placeholders are put in front when the ids hold none), and an image may
be a .npy of already-normalised pixels, so runs compare exactly with other implementations. --json also prints
the generated token ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import numpy as np

from ziya_jax import cli
from ziya_jax.data import formats, images
from ziya_jax.decode import DecodeConfig, generate


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} wants comma-separated integers, got {text!r}") from None


def raw_inputs(args, cfg, num_images: int) -> dict:
    """--input-ids (and --qformer-input-ids): the model input as given, placeholders put first if missing."""
    ids = parse_ids(args.input_ids, "--input-ids")
    if num_images and cfg.image_token_id not in ids:
        ids = [cfg.image_token_id] * (cfg.num_query_tokens * num_images) + ids
    batch = {"input_ids": np.asarray([ids], np.int32)}
    if cfg.variant == "chat":
        if not args.qformer_input_ids:
            raise ValueError("a Chat model with --input-ids also needs --qformer-input-ids")
        q = np.asarray([parse_ids(args.qformer_input_ids, "--qformer-input-ids")], np.int32)
        batch.update(qformer_ids=q, qformer_mask=np.ones_like(q))
    return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ziya_jax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_flags(parser)
    parser.add_argument("--image", action="append", default=[], help="image file or .npy pixels; repeatable")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt")
    text.add_argument("--input-ids", help="raw LLM token ids, e.g. 1,2,3")
    parser.add_argument("--qformer-input-ids", help="raw Q-Former instruction ids (Chat models, with --input-ids)")
    parser.add_argument("--eos-token-id", type=int, help="with --input-ids (default: the model config's)")
    parser.add_argument("--json", action="store_true")
    cli.add_decode_flags(parser, DecodeConfig())
    args = parser.parse_args(argv)
    try:
        if args.prompt is not None and any("\udc80" <= c <= "\udcff" for c in args.prompt):  # undecodable bytes
            raise ValueError("--prompt is not valid UTF-8")
        model = cli.load(args, need_tokenizer=args.prompt is not None)
        cfg = model.cfg
        pixels = [images.load_image(p, cfg.vision.image_size) for p in args.image]
        dc = cli.decode_config(args, DecodeConfig())
        if args.prompt is not None:
            turns = [formats.Turn(args.prompt, None)]
            inputs = formats.prompt_input(turns, len(pixels), model.tok, model.qtok, cfg, dc.max_new_tokens)
            batch = {k: v[None] for k, v in inputs.items()}
            dc = dataclasses.replace(dc, eos_token_id=model.tok.eos_id, pad_token_id=model.tok.pad_id)
        else:
            batch = raw_inputs(args, cfg, len(pixels))
            eos = cfg.llm.eos_token_id if args.eos_token_id is None else args.eos_token_id
            dc = dataclasses.replace(dc, eos_token_id=eos, pad_token_id=cfg.llm.pad_token_id)
        tokens, lengths = generate(
            model.params,
            cfg,
            pixel_values=np.stack(pixels)[None] if pixels else None,
            dc=dc,
            rng=jax.random.key(args.seed),
            **batch,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    new = [int(t) for t in tokens[0, : lengths[0]]]
    answer = model.tok.decode([t for t in new if t != dc.eos_token_id]) if model.tok is not None else None
    if answer is not None:
        print(answer)
    if args.json:
        print(json.dumps({"answer": answer, "token_ids": new}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
