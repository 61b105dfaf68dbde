"""python -m ziya_jax.data {tokenizers, synthetic, manifest, convert, bmmic} ...: build the demo tokenizers, TFDS
data sets, training manifests from public data sets' released files, and BMMIC instruction data (`bmmic --help`)."""

from __future__ import annotations

import argparse
import sys

from ziya_jax.data.images import DEFAULT_MAX_BYTES


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bmmic"]:  # a command family of its own, with its own subcommands
        from ziya_jax.data.bmmic.__main__ import main as bmmic_main

        return bmmic_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ziya_jax.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizers", help="train the demo LLM and Q-Former sentencepiece models")
    tok.add_argument("--out", required=True)
    tok.add_argument("--llm-vocab-size", type=int, default=640)
    tok.add_argument("--qformer-vocab-size", type=int, default=512)
    tok.add_argument("--seed", type=int, default=0)
    syn = sub.add_parser("synthetic", help="write the synthetic set as an ArrayRecord TFDS data set")
    syn.add_argument("--data-dir", required=True)
    syn.add_argument("--image-size", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    for split, n in (("train", 20000), ("validation", 1000), ("test", 1000)):
        syn.add_argument(f"--{split}", type=int, default=n, help=f"examples in {split} (default {n})")
    man = sub.add_parser("manifest", help="write a LLaVA-style JSON/JSONL manifest + images as a TFDS data set")
    man.add_argument("--data-dir", required=True)
    man.add_argument("--name", required=True, help="config name: the data set is llava_manifest/NAME")
    man.add_argument("--split", action="append", required=True, metavar="SPLIT=FILE")
    man.add_argument(
        "--image-dir", default="", help="image paths are relative to this (default: the manifest's folder)"
    )
    man.add_argument("--strict", action="store_true", help="fail on a missing image or bad entry")
    man.add_argument(
        "--allow-any-image-path",
        action="store_true",
        help="let image paths lead out of the image folder (absolute, .., symlinks); off by default",
    )
    man.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="image files above this size are left out unread (default %(default)s)",
    )
    man.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild NAME if it exists (a build from other inputs is otherwise refused)",
    )
    from ziya_jax.data import formats, released

    conv = sub.add_parser(
        "convert",
        help="write a training manifest (JSONL) from a public data set's released files (formats: docs/data.md)",
    )
    conv.add_argument("--format", required=True, choices=list(released.FORMATS))
    conv.add_argument("--input", action="append", required=True, metavar="FILE", help="a released file (repeatable)")
    conv.add_argument(
        "--images",
        help="the image folder the manifest's paths are relative to; given, every image is checked and a record "
        "whose image is missing is skipped",
    )
    conv.add_argument("--out", required=True, help="the manifest to write (JSON lines)")
    conv.add_argument("--split", help="the split to convert where the files hold several (default: train)")
    conv.add_argument("--task", choices=formats.TASKS, help="for grounding formats: one task (default: both)")
    # listed for --help only: main() hands `bmmic ...` to its own parser before this one parses anything
    sub.add_parser("bmmic", help="bilingual instruction data through an LLM endpoint (bmmic --help)")
    args = parser.parse_args(argv)

    if args.command == "convert":
        try:
            report = released.convert(args.format, args.input, args.out, args.images, args.split, args.task)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(report.summary())
        return 0
    if args.command == "tokenizers":
        from ziya_jax.data.synthetic import train_demo_tokenizers

        for path in train_demo_tokenizers(args.out, args.llm_vocab_size, args.qformer_vocab_size, seed=args.seed):
            print(path)
        return 0
    from ziya_jax.data import tfds_builders

    if args.command == "synthetic":
        config = tfds_builders.SyntheticConfig(
            name=f"{args.image_size}px_seed{args.seed}_{args.train}",
            image_size=args.image_size,
            seed=args.seed,
            train=args.train,
            validation=args.validation,
            test=args.test,
        )
        builder = tfds_builders.build_synthetic(args.data_dir, config)
    else:
        splits = dict(s.split("=", 1) for s in args.split)
        if any(not v for v in splits.values()) or len(splits) != len(args.split):
            parser.error(f"--split wants distinct SPLIT=FILE pairs, got {args.split}")
        try:
            builder = tfds_builders.build_manifest(
                args.data_dir,
                args.name,
                splits,
                args.image_dir,
                args.strict,
                args.allow_any_image_path,
                args.max_image_bytes,
                args.overwrite,
            )
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(
        f"{builder.name}/{builder.builder_config.name} in {builder.data_dir}: "
        + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
