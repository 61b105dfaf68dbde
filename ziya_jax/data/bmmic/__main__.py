"""python -m ziya_jax.data bmmic {generate, translate, rewrite, filter} ...: bilingual multi-modal in-context
instruction data built by an LLM behind any OpenAI-compatible chat-completions endpoint (see docs/bmmic.md).

  generate   captions and tagged boxes per image -> conversation, detail and complex-reasoning data, en and zh
  translate  LLaVA-Instruct, M3IT, VQAv2 or GQA files -> Chinese, in the same layout
  rewrite    a manifest -> its pairs rewritten by deepening, concretizing, increasing reasoning, adding constraints
  filter     manifests -> the records every rule passes, and the rejections counted by reason

The LLM stages cache every accepted reply (--cache, default OUT.cache.sqlite): a rerun, after a crash or a
kill, asks only what is missing and writes the same output. --shard K/N runs the K-th of N contiguous blocks;
the N outputs (JSONL), concatenated in order, are the single run's. Each stage writes OUT.report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from ziya_jax.data.bmmic import filters, prompting, scenes, stages, translate
from ziya_jax.data.manifest import read_manifest
from ziya_jax.llm import LLMClient, add_endpoint_args, endpoint_from_args


def _pair(text: str, known: Sequence[str], what: str) -> tuple[str, str]:
    fmt, sep, path = text.partition(":")
    if not sep or fmt not in known:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: want FORMAT:PATH with FORMAT one of {list(known)}")
    return fmt, path


def _list(known: Sequence[str]):
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: want a comma-separated subset of {list(known)}")
        return values

    return parse


def _llm_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    add_endpoint_args(p)
    g = p.add_argument_group("requests")
    g.add_argument("--prompts", help="a prompt file of one's own (default: the package's; format in docs/bmmic.md)")
    g.add_argument("--examples", type=int, help="in-context examples per request, drawn per item (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seeds the draw of in-context examples")
    g.add_argument("--temperature", type=float, default=temperature)
    g.add_argument("--top-p", type=float)
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--parse-retries", type=int, default=2, help="times a reply that is not the asked JSON is re-asked")
    g.add_argument("--shard", help="K/N: run the K-th of N contiguous blocks of the job")
    g.add_argument("--report", help="where the run's counts go (default OUT.report.json)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ziya_jax.data bmmic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="stage", required=True)

    g = sub.add_parser("generate", help="instruction data from captions and tagged boxes")
    g.add_argument(
        "--captions",
        action="append",
        default=[],
        type=lambda t: _pair(t, scenes.CAPTION_FORMATS, "--captions"),
        help=f"FORMAT:PATH, FORMAT one of {list(scenes.CAPTION_FORMATS)} (repeatable)",
    )
    g.add_argument(
        "--boxes",
        action="append",
        default=[],
        type=lambda t: _pair(t, scenes.BOX_FORMATS, "--boxes"),
        help=f"FORMAT:PATH, FORMAT one of {list(scenes.BOX_FORMATS)} (repeatable)",
    )
    g.add_argument("--min-score", type=float, default=0.0, help="detector boxes scoring under this are dropped")
    g.add_argument("--image-dir", help="the images' folder (image sizes, --send-images)")
    g.add_argument("--types", type=_list(prompting.TYPES), default=list(prompting.TYPES), help="default: all three")
    g.add_argument("--langs", type=_list(("en", "zh")), default=["en", "zh"])
    g.add_argument("--limit", type=int, help="the first N images only")
    g.add_argument("--send-images", action="store_true", help="send each image too (a vision endpoint)")
    g.add_argument("--out", required=True, help="the manifest to write (.jsonl, or .json for one list)")
    _llm_flags(g, temperature=0.7)

    t = sub.add_parser("translate", help="English instruction or VQA data into Chinese")
    t.add_argument("--format", required=True, choices=translate.FORMATS)
    t.add_argument("--input", required=True, help="the file (vqav2/gqa: the questions file or its folder)")
    t.add_argument("--split", help="vqav2/gqa: the split in the file names (default val2014 / testdev)")
    t.add_argument("--out", required=True, help="llava/m3it: the file to write; vqav2/gqa: the folder")
    _llm_flags(t, temperature=0.2)

    r = sub.add_parser("rewrite", help="rewrite a manifest's pairs by the four schemes")
    r.add_argument("--input", required=True, help="a manifest (LLaVA conversations, JSON list or JSONL)")
    r.add_argument(
        "--schemes", type=_list(prompting.SCHEMES), default=list(prompting.SCHEMES), help="default: all four"
    )
    r.add_argument("--image-dir", help="the images' folder (--send-images; default: the manifest's folder)")
    r.add_argument("--send-images", action="store_true", help="send each record's first image too")
    r.add_argument("--out", required=True, help="the manifest to write")
    _llm_flags(r, temperature=0.7)

    f = sub.add_parser("filter", help="rule-based filtering, every rejection counted by reason")
    f.add_argument("--input", required=True, nargs="+", help="manifests, read in order")
    f.add_argument("--out", required=True, help="the manifest of kept records")
    f.add_argument("--rejected", help="JSON lines of the rejected records with reason and detail")
    f.add_argument("--report", help="counts by reason (default OUT.report.json)")
    f.add_argument("--object-names", help="JSON {label: {en: [names], zh: [names]}} of more known objects")
    d = filters.FilterConfig
    f.add_argument("--max-turn-chars", type=int, default=d.max_turn_chars)
    f.add_argument("--min-cjk-share", type=float, default=d.min_cjk_share, help="of Chinese records' letters")
    f.add_argument("--max-cjk-share-en", type=float, default=d.max_cjk_share_en, help="of English records' letters")
    f.add_argument("--max-english-run", type=int, default=d.max_english_run, help="English words in a row in zh")
    f.add_argument("--near-duplicate", type=float, default=d.near_duplicate, help="3-gram Jaccard threshold")
    return p


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_records(path: str, records: Sequence[dict]) -> None:
    """A manifest: one JSON list for .json, else JSON lines (which concatenate across shards)."""
    if path.endswith(".json"):
        _write_atomic(path, json.dumps(list(records), ensure_ascii=False) + "\n")
    else:
        _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _write_report(args, report: dict) -> None:
    path = args.report or f"{args.out.rstrip('/')}.report.json"
    _write_atomic(path, json.dumps(report, ensure_ascii=False, indent=1) + "\n")


def _settings(args, stage: str, image_dir: str | None = None) -> stages.Settings:
    params = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    if args.top_p is not None:
        params["top_p"] = args.top_p
    return stages.Settings(
        prompts=prompting.load(stage, args.prompts),
        examples=args.examples,
        seed=args.seed,
        params=params,
        send_images=getattr(args, "send_images", False),
        image_dir=image_dir,
    )


def _run_llm(args, stage: str, items: list[stages.Item], settings: stages.Settings, parse) -> tuple[list, dict]:
    k, n = stages.parse_shard(args.shard)
    mine = stages.shard(items, k, n)
    endpoint = endpoint_from_args(args)
    cache = args.cache or f"{args.out.rstrip('/')}.cache.sqlite"
    with LLMClient(endpoint, cache=cache, parse_retries=args.parse_retries) as client:
        done, stats = stages.ask(client, stage, mine, settings, parse, progress=not args.no_progress)
    print(f"{stage}: {stats.summary()}", file=sys.stderr)
    report = {"stage": stage, "shard": f"{k}/{n}", "items": len(mine), "written": len(done), "llm": stats.as_dict()}
    return done, report


def _generate(args) -> int:
    if not args.captions and not args.boxes:
        raise ValueError("generate needs --captions and/or --boxes")
    found = scenes.read_scenes(args.captions, args.boxes, args.image_dir, args.min_score)
    found = found[: args.limit] if args.limit else found
    items, empty = stages.generate_items(found, args.types, args.langs)
    settings = _settings(args, "generate", args.image_dir)
    done, report = _run_llm(args, "generate", items, settings, lambda it: prompting.parse_turns)
    write_records(args.out, [stages.generated_record(it, turns) for it, turns in done])
    _write_report(args, report | {"images": len(found), "images_without_captions_or_boxes": empty})
    return 0


def _translate(args) -> int:
    job = translate.Job(args.format, args.input, args.split)
    settings = _settings(args, "translate")
    done, report = _run_llm(args, "translate", job.items, settings, lambda it: prompting.texts_parser(len(it.query)))
    if args.format in ("llava", "m3it"):
        write_records(args.out, job.records(done))
    else:
        for name, content in job.layout(done).items():
            _write_atomic(os.path.join(args.out, name), json.dumps(content, ensure_ascii=False) + "\n")
    _write_report(args, report | {"skipped_entries": job.skipped})
    return 0


def _rewrite(args) -> int:
    entries, invalid = read_manifest(args.input)
    items, skipped = stages.rewrite_items(entries, args.schemes)
    image_dir = args.image_dir or os.path.dirname(os.path.abspath(args.input))
    settings = _settings(args, "rewrite", image_dir)
    done, report = _run_llm(args, "rewrite", items, settings, lambda it: prompting.parse_turns)
    write_records(args.out, [stages.rewritten_record(it, turns) for it, turns in done])
    skipped["invalid_line"] += len(invalid)
    _write_report(args, report | {"skipped_entries": dict(+skipped)})
    return 0


def _filter(args) -> int:
    entries, invalid = [], {}
    for path in args.input:
        e, bad = read_manifest(path)
        entries += e
        invalid |= bad
    extra = None
    if args.object_names:
        with open(args.object_names, encoding="utf-8") as f:
            extra = json.load(f)
    cfg = filters.FilterConfig(
        args.max_turn_chars, args.min_cjk_share, args.max_cjk_share_en, args.max_english_run, args.near_duplicate
    )
    kept, rejected, counts = filters.filter_entries(entries, invalid, cfg, filters.load_object_names(extra))
    write_records(args.out, kept)
    if args.rejected:
        _write_atomic(
            args.rejected,
            "".join(
                json.dumps(
                    {"reason": r.reason, "detail": r.detail, "where": r.where, "record": r.record}, ensure_ascii=False
                )
                + "\n"
                for r in rejected
            ),
        )
    report = {"stage": "filter", "read": len(entries) + len(invalid), "kept": len(kept), "rejected": dict(counts)}
    _write_report(args, report)
    print(f"filter: kept {len(kept)} of {report['read']}; rejected {dict(counts)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": _generate, "translate": _translate, "rewrite": _rewrite, "filter": _filter}[args.stage](
            args
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
