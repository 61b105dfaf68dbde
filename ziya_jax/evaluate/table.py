"""The results table, laid out like the paper's English (Table 5) and Chinese (Table 6) benchmark tables, with
Ziya-Visual-Chat's published numbers beside ours. All scores x100.

The published numbers are the paper's (arXiv 2310.08166; docs/reference.md lists them); a row without a
published number below is printed as n/a rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping

PAPER = "Ziya-Visual-Chat (paper)"
# (row, score name = the task's output name, metric key, published value or None)
ENGLISH = (
    ("NoCaps val CIDEr", "nocaps", "CIDEr", 119.6),
    ("Flickr30K test CIDEr", "flickr30k", "CIDEr", 83.4),
    ("VQAv2 VQA score", "vqav2", "accuracy", 75.5),
    ("OKVQA VQA score", "okvqa", "accuracy", 47.9),
    ("GQA exact match", "gqa", "accuracy", 51.1),
    ("ScienceQA-IMG accuracy", "scienceqa_img", "accuracy", 65.9),
    ("VizWiz VQA score", "vizwiz", "accuracy", 34.0),
)
CHINESE = (
    ("COCO-CN CIDEr", "coco_cn", "CIDEr", 111.4),
    ("Flickr30k-CNA CIDEr", "flickr30k_cna", "CIDEr", None),
    ("Flickr30k-CNA IR@1", "retrieval_flickr30k_cna", "IR@1", None),
    ("Flickr30k-CNA TR@1", "retrieval_flickr30k_cna", "TR@1", None),
    ("COCO-CN IR@1", "retrieval_coco_cn", "IR@1", None),
    ("COCO-CN TR@1", "retrieval_coco_cn", "TR@1", None),
    ("GQA (T) exact match", "gqa_zh", "accuracy", None),
    ("VQAv2 (T) VQA score", "vqav2_zh", "accuracy", None),
)


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _block(title: str, rows, scores: Mapping[str, Mapping]) -> list[str]:
    width = max(len(r[0]) for r in rows) + 2
    lines = [title, f"{'':<{width}}{'ours':>10}{PAPER:>28}"]
    for label, name, metric, paper in rows:
        ours = scores.get(name, {}).get(metric)
        lines.append(f"{label:<{width}}{'-' if ours is None else _cell(ours):>10}{_cell(paper):>28}")
    return lines


def format_paper_table(scores: Mapping[str, Mapping]) -> str:
    """scores: {task output name: its scores dict} -> both tables; '-' = not evaluated, n/a = not published."""
    lines = _block("English benchmarks (paper Table 5 layout)", ENGLISH, scores)
    lines += [""] + _block("Chinese benchmarks (paper Table 6 layout)", CHINESE, scores)
    conventions = sorted({s["tokenization"] for s in scores.values() if isinstance(s, Mapping) and "tokenization" in s})
    if conventions:
        lines += [""] + [f"captions: {c}" for c in conventions]
    return "\n".join(lines)
