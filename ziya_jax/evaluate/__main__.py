"""Evaluate a checkpoint on a benchmark from local annotation files (nothing is downloaded):

    python -m ziya_jax.evaluate --checkpoint CKPT --task TASK --data PATH [--image-dir DIR] [--split S]
                                [--limit N] [--num-beams K] [--out DIR]
    python -m ziya_jax.evaluate --checkpoint CKPT --task synthetic [--limit N]
    python -m ziya_jax.evaluate --checkpoint CKPT --task llava_bench --data DIR [--image-dir COCO_VAL2014] [--lang zh]
                                --judge-base-url URL --judge-model NAME [--judge-api-key-file FILE]
    python -m ziya_jax.evaluate --task llava_bench --answers ANSWERS.jsonl --data DIR --judge-base-url URL ...

Writes OUT/NAME.predictions.jsonl and OUT/NAME.scores.json (llava_bench: NAME.answers.jsonl, NAME.reviews.jsonl
and NAME.scores.json; judge replies cached in OUT/judge_cache.sqlite), then prints the paper-style table of every
score file in OUT (so running the tasks one after another fills it in). File layouts:
ziya_jax/evaluate/datasets.py and ziya_jax/evaluate/llava_bench.py.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
import time

from ziya_jax import cli
from ziya_jax.evaluate import tasks as tasks_mod
from ziya_jax.llm import add_endpoint_args

ALL_TASKS = sorted(tasks_mod.TASKS) + ["llava_bench", "synthetic"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ziya_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_flags(p, checkpoint_required=False)  # llava_bench may judge an answer file instead
    p.add_argument("--task", required=True, choices=ALL_TASKS)
    p.add_argument("--data", help="annotation file or the folder holding it (not needed for synthetic)")
    p.add_argument("--image-dir", help="images folder (default: the annotation file's folder)")
    p.add_argument(
        "--allow-any-image-path",
        action="store_true",
        help="let annotations name images outside the images folder (absolute, .., symlinks)",
    )
    p.add_argument("--split", help="split name in the released files (default: the paper's split)")
    p.add_argument("--lang", choices=("en", "zh"), help="vqav2/gqa/llava_bench: zh evaluates the translated (T) sets")
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
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = none (the demo chats with 1.18)")
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
    llava = p.add_argument_group("llava_bench")
    llava.add_argument("--rules", help="the judge's rule.json (default: DATA/rule.json)")
    llava.add_argument("--answers", help="judge this LLaVA answer file instead of a checkpoint's answers")
    llava.add_argument(
        "--judge-parse-retries",
        type=int,
        default=2,
        help="times the judge is asked again when its review has no readable scores (default 2)",
    )
    add_endpoint_args(p, prefix="judge-", required=False)  # only llava_bench has a judge
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
    if args.task == "llava_bench":
        return _llava_bench(args)
    if not args.checkpoint:
        raise ValueError(f"--task {args.task} needs --checkpoint")
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
        repetition_penalty=args.repetition_penalty,
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


def _llava_bench(args) -> int:
    """Answers from the checkpoint (or --answers), reviewed by the judge endpoint; see llava_bench."""
    from ziya_jax.evaluate import llava_bench
    from ziya_jax.evaluate.table import format_llava_bench, format_paper_table
    from ziya_jax.llm import LLMClient, endpoint_from_args

    if not (args.judge_base_url and args.judge_model):
        raise ValueError("--task llava_bench needs --judge-base-url and --judge-model (an OpenAI-compatible judge)")
    if bool(args.checkpoint) == bool(args.answers):
        raise ValueError("--task llava_bench needs --checkpoint (answers from the model) or --answers FILE, not both")
    if args.judge_parse_retries < 0:
        raise ValueError("--judge-parse-retries must be >= 0")
    if importlib.util.find_spec("openai") is None:  # known before the answers are generated, not after
        raise ValueError("the judge's client needs the openai package (pip install openai)")
    bench = llava_bench.read(args.data, args.image_dir, args.rules, args.limit, args.allow_any_image_path)
    endpoint = endpoint_from_args(args, prefix="judge-")  # reads the key now, not after generating
    lang = args.lang or "en"
    name = llava_bench.output_name(bench.layout, lang)
    if args.answers:
        answers = llava_bench.read_answers(args.answers, bench)
        model_id = os.path.splitext(os.path.basename(args.answers))[0]
        source = {"answers": os.path.abspath(args.answers)}
    else:
        from ziya_jax.decode import DecodeConfig
        from ziya_jax.evaluate.inference import Generator

        model = cli.load(args)
        decode = DecodeConfig(
            max_new_tokens=args.max_new_tokens or llava_bench.MAX_NEW_TOKENS,
            min_new_tokens=args.min_new_tokens,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            repetition_penalty=args.repetition_penalty,
        )
        generator = Generator(model.params, model.cfg, model.tok, model.qtok, batch_size=args.batch_size)
        answers = llava_bench.generate_answers(bench, generator, decode, model.cfg.vision.image_size)
        model_id = os.path.basename(os.path.normpath(args.checkpoint))
        source = {
            "checkpoint": os.path.abspath(args.checkpoint),
            "decode": {
                "num_beams": args.num_beams,
                "max_new_tokens": decode.max_new_tokens,
                "repetition_penalty": args.repetition_penalty,
            },
        }
    os.makedirs(args.out, exist_ok=True)
    records = llava_bench.answer_records(bench, answers, model_id)
    llava_bench.write_jsonl(os.path.join(args.out, f"{name}.answers.jsonl"), records)  # kept if the judge fails
    cache = args.judge_cache or os.path.join(args.out, "judge_cache.sqlite")
    with LLMClient(endpoint, cache=cache, parse_retries=args.judge_parse_retries) as client:
        reviews, scores, stats = llava_bench.judge(bench, records, client)
    llava_bench.write_jsonl(os.path.join(args.out, f"{name}.reviews.jsonl"), reviews)
    with open(os.path.join(args.out, f"{name}.scores.json"), "w", encoding="utf-8") as f:
        json.dump(scores | {"task": "llava_bench", "lang": lang} | source, f, ensure_ascii=False, indent=1)
    print(f"judge: {stats.summary()}")
    if not scores["judged"]:
        raise ValueError(f"the judge reviewed none of the {scores['n']} answers ({dict(stats.failures)})")
    print(format_llava_bench(scores, lang))
    print()
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
