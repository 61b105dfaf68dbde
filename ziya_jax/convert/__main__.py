"""python -m ziya_jax.convert {from-hf,to-hf} ...: Hugging Face checkpoints <-> ziya_jax Orbax checkpoints."""

from __future__ import annotations

import argparse
import os
import sys


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF Blip2/InstructBlip (+ separate LLaMA) -> ziya_jax checkpoint")
    a.add_argument("--hf-dir", required=True, help="Blip2/InstructBlip directory (config.json + weights)")
    a.add_argument("--llm-dir", help="LlamaForCausalLM directory, when the LLM is kept apart (Ziya layout)")
    a.add_argument("--llm-delta-dir", help="Ziya-LLaMA delta weights; --llm-dir is then the base LLaMA")
    a.add_argument("--image-token-id", type=int, help="image placeholder id, if config.json lacks image_token_index")
    a.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pytorch_model*.bin (torch.load(weights_only=True)); off by default",
    )
    a.add_argument(
        "--qformer-vocab",
        help="bert-base-uncased's vocab.txt for the Q-Former tokenizer (default: HF_DIR/qformer_tokenizer/vocab.txt)",
    )
    a.add_argument("--out", required=True, help="new ziya_jax checkpoint directory (its tokenizers in OUT/tokenizer)")
    b = sub.add_parser("to-hf", help="ziya_jax checkpoint -> HF directory (from_pretrained-ready)")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--llm-only", action="store_true", help="export only the language model (LlamaForCausalLM)")
    b.add_argument("--max-shard-size", default="5GB", type=parse_size, help="e.g. 5GB, 500MB")
    args = parser.parse_args(argv)

    from ziya_jax.checkpoint import load_model, save_model
    from ziya_jax.convert import export_hf, load_hf
    from ziya_jax.convert.io import copy_hf_tokenizers

    try:
        if args.command == "from-hf":
            params, cfg = load_hf(args.hf_dir, args.llm_dir, args.llm_delta_dir, args.allow_pickle, args.image_token_id)
            if args.qformer_vocab and not os.path.isfile(args.qformer_vocab):
                raise FileNotFoundError(f"--qformer-vocab {args.qformer_vocab}: no such file")
            save_model(args.out, params, cfg)
            llm_dirs = [
                args.llm_delta_dir,
                args.llm_dir,
                args.hf_dir,
            ]  # a Ziya-LLaMA delta holds its extended tokenizer
            copied = copy_hf_tokenizers(args.out, llm_dirs, args.hf_dir, args.qformer_vocab)
            for line in copied:
                print(f"tokenizer: {line}")
            if not any(c.startswith("tokenizer.model") for c in copied):
                print(f"note: no tokenizer.model found; put the LLM's in {args.out}/tokenizer", file=sys.stderr)
            if not any(c.startswith("vocab.txt") for c in copied):
                print(
                    f"note: no Q-Former vocab.txt found (--qformer-vocab); put one in {args.out}/tokenizer",
                    file=sys.stderr,
                )
            print(f"wrote {args.out} ({cfg.variant} model)")
        else:
            params, cfg = load_model(args.checkpoint)
            for note in export_hf(params, cfg, args.out, args.llm_only, args.max_shard_size):
                print(note)
            print(f"wrote {args.out}")
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
