"""Evaluate a checkpoint on a benchmark from local annotation files (nothing is downloaded):

    python -m ziya_jax.evaluate --checkpoint CKPT --task TASK --data PATH [--image-dir DIR] [--split S]
                                [--limit N] [--num-beams K] [--out DIR]
    python -m ziya_jax.evaluate --checkpoint CKPT --task synthetic [--limit N]

Writes OUT/NAME.predictions.jsonl and OUT/NAME.scores.json, then prints the paper-style table of every score
file in OUT (so running the tasks one after another fills it in). File layouts: ziya_jax/evaluate/datasets.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

from ziya_jax import cli
from ziya_jax.evaluate import tasks as tasks_mod

ALL_TASKS = sorted(tasks_mod.TASKS) + ["synthetic"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ziya_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_flags(p)
    p.add_argument("--task", required=True, choices=ALL_TASKS)
    p.add_argument("--data", help="annotation file or the folder holding it (not needed for synthetic)")
    p.add_argument("--image-dir", help="images folder (default: the annotation file's folder)")
    p.add_argument(
        "--allow-any-image-path",
        action="store_true",
        help="let annotations name images outside the images folder (absolute, .., symlinks)",
    )
    p.add_argument("--split", help="split name in the released files (default: the paper's split)")
    p.add_argument("--lang", choices=("en", "zh"), help="vqav2/gqa: zh evaluates the translated (T) sets")
    p.add_argument(
        "--retrieval-set",
        default="flickr30k_cna",
        help="name of the caption set the retrieval scores are filed under (default flickr30k_cna)",
    )
    p.add_argument("--limit", type=int, help="first N examples only (synthetic: N per language, default 200)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, help="default: the task's (captions 40, answers 10)")
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--prompt", help="prompt template with {question} (VQA tasks) overriding the default")
    p.add_argument("--itm-top-k", type=int, default=0, help="retrieval: re-rank each query's top K with ITM")
    p.add_argument(
        "--en-tokenizer",
        choices=("auto", "java", "python"),
        default="auto",
        help="English caption tokenisation: Stanford PTB via Java, or its Python equivalent",
    )
    p.add_argument("--meteor", action="store_true", help="also METEOR (English captions, needs Java)")
    p.add_argument("--show", type=int, default=3, help="synthetic: examples printed per language")
    p.add_argument("--out", default="eval_results", help="output folder (default eval_results)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ziya_jax.decode import DecodeConfig

    if args.task != "synthetic" and not args.data:
        raise ValueError(f"--task {args.task} needs --data (the annotation file or its folder)")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    items = None
    if args.task != "synthetic":  # read (and check) the data before spending time on the model
        items = tasks_mod.load_items(
            args.task, args.data, args.image_dir, args.split, args.limit, args.allow_any_image_path
        )
    model = cli.load(args, decode=False)  # retrieval and choice scoring run the stacked model
    params, cfg, tok, qtok = model.params, model.cfg, model.tok, model.qtok
    os.makedirs(args.out, exist_ok=True)
    if args.task == "synthetic":
        return _synthetic(args, params, cfg, tok, qtok)
    spec = tasks_mod.TASKS[args.task]
    decode = DecodeConfig(
        max_new_tokens=args.max_new_tokens or spec.max_new_tokens or 1,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
    )
    settings = tasks_mod.Settings(
        batch_size=args.batch_size,
        decode=decode,
        prompt=args.prompt,
        lang=args.lang,
        itm_top_k=args.itm_top_k,
        en_tokenizer=args.en_tokenizer,
        meteor=args.meteor,
    )
    records, scores = tasks_mod.run_task(args.task, items, params, cfg, tok, qtok, settings)
    name = tasks_mod.output_name(args.task, args.lang or spec.lang, args.retrieval_set)
    _write(
        args.out,
        name,
        records,
        scores
        | {
            "task": args.task,
            "checkpoint": os.path.abspath(args.checkpoint),
            "decode": {"num_beams": args.num_beams, "max_new_tokens": decode.max_new_tokens},
        },
    )
    from ziya_jax.evaluate.table import format_paper_table

    print(format_paper_table(_all_scores(args.out)))
    return 0


def _synthetic(args, params, cfg, tok, qtok) -> int:
    from ziya_jax.evaluate.synthetic import evaluate_synthetic, format_table

    start = time.perf_counter()
    results = evaluate_synthetic(
        params,
        cfg,
        tok,
        qtok,
        image_size=cfg.vision.image_size,
        n=args.limit or 200,
        batch_size=args.batch_size,
        show=args.show,
        en_tokenizer=args.en_tokenizer,
    )
    seconds = time.perf_counter() - start
    records = [ex | {"lang": lang} for lang, r in results.items() for ex in r.get("predictions", [])]
    scores = {lang: {k: v for k, v in r.items() if k not in ("predictions", "examples")} for lang, r in results.items()}
    _write(args.out, "synthetic", records, scores | {"seconds": seconds})
    print(format_table(results))
    print(f"({seconds:.1f} s)")
    return 0


def _write(out: str, name: str, records, scores) -> None:
    with open(os.path.join(out, f"{name}.predictions.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(out, f"{name}.scores.json"), "w", encoding="utf-8") as f:
        json.dump(scores, f, ensure_ascii=False, indent=1)


def _all_scores(out: str) -> dict:
    scores = {}
    for path in sorted(glob.glob(os.path.join(out, "*.scores.json"))):
        with open(path, encoding="utf-8") as f:
            scores[os.path.basename(path)[: -len(".scores.json")]] = json.load(f)
    return scores


if __name__ == "__main__":
    sys.exit(main())
