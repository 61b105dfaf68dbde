"""The results tables, laid out like the paper's English (Table 5), Chinese (Table 6) and LLaVA-Bench (Table 7)
tables, with the published numbers of Ziya-Visual-Base and Ziya-Visual-Chat beside ours. All scores x100
except LLaVA-Bench's mean judge scores (1 to 10).

The published numbers are the paper's (arXiv 2310.08166; docs/reference.md lists them); a cell without a
published number below is printed as n/a rather than guessed. The paper's LLaVA-Bench numbers stand beside the
COCO set's scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

BASE, CHAT = "Ziya-Visual-Base (paper)", "Ziya-Visual-Chat (paper)"
# (row, score name = the task's output name, metric key, Base's published value, Chat's published value)
ENGLISH = (
    ("NoCaps val CIDEr", "nocaps", "CIDEr", None, 119.6),
    ("Flickr30K test CIDEr", "flickr30k", "CIDEr", None, 83.4),
    ("VQAv2 VQA score", "vqav2", "accuracy", None, 75.5),
    ("OKVQA VQA score", "okvqa", "accuracy", None, 47.9),
    ("GQA exact match", "gqa", "accuracy", None, 51.1),
    ("ScienceQA-IMG accuracy", "scienceqa_img", "accuracy", None, 65.9),
    ("VizWiz VQA score", "vizwiz", "accuracy", None, 34.0),
)
CHINESE = (
    ("COCO-CN CIDEr", "coco_cn", "CIDEr", None, 111.4),
    ("Flickr30k-CNA CIDEr", "flickr30k_cna", "CIDEr", None, None),
    ("Flickr30k-CNA IR@1", "retrieval_flickr30k_cna", "IR@1", None, None),
    ("Flickr30k-CNA TR@1", "retrieval_flickr30k_cna", "TR@1", None, None),
    ("COCO-CN IR@1", "retrieval_coco_cn", "IR@1", None, None),
    ("COCO-CN TR@1", "retrieval_coco_cn", "TR@1", None, None),
    ("GQA (T) exact match", "gqa_zh", "accuracy", None, None),
    ("VQAv2 (T) VQA score", "vqav2_zh", "accuracy", None, None),
)
# LLaVA-Bench relative scores by language, model and category ("all" = every question).
LLAVA_CATEGORIES = (("conv", "Conversation"), ("detail", "Detail"), ("complex", "Complex"), ("all", "All"))
LLAVA_PAPER = {
    "en": {BASE: {}, CHAT: {"all": 84.1}},
    "zh": {BASE: {}, CHAT: {"all": 86.7}},
}
LANGUAGES = {"en": "English", "zh": "Chinese"}


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ours(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def _block(title: str, rows, scores: Mapping[str, Mapping]) -> list[str]:
    width = max(len(r[0]) for r in rows) + 2
    lines = [title, f"{'':<{width}}{'ours':>10}{BASE:>28}{CHAT:>28}"]
    for label, name, metric, base, chat in rows:
        ours = scores.get(name, {}).get(metric)
        lines.append(f"{label:<{width}}{_ours(ours):>10}{_cell(base):>28}{_cell(chat):>28}")
    return lines


def _llava_row(label: str, values: Mapping, fmt, width: int) -> str:
    return f"{label:<{width}}" + "".join(f"{fmt(values.get(key)):>14}" for key, _ in LLAVA_CATEGORIES)


def _llava_block(scores: Mapping[str, Mapping]) -> list[str]:
    width = 36
    lines = ["LLaVA-Bench relative score, judged by an LLM (paper Table 7 layout)"]
    lines.append(f"{'':<{width}}" + "".join(f"{title:>14}" for _, title in LLAVA_CATEGORIES))
    for lang, language in LANGUAGES.items():
        ours = scores.get("llava_bench" + ("_zh" if lang == "zh" else ""), {})
        relative = {key: ours[key]["relative"] for key, _ in LLAVA_CATEGORIES if key in ours}
        lines.append(_llava_row(f"{language} ours", relative, _ours, width))
        for model, published in LLAVA_PAPER[lang].items():
            lines.append(_llava_row(f"{language} {model}", published, _cell, width))
    return lines


def format_paper_table(scores: Mapping[str, Mapping]) -> str:
    """scores: {task output name: its scores dict} -> the three tables; '-' = not evaluated, n/a = not published."""
    lines = _block("English benchmarks (paper Table 5 layout)", ENGLISH, scores)
    lines += [""] + _block("Chinese benchmarks (paper Table 6 layout)", CHINESE, scores)
    lines += [""] + _llava_block(scores)
    conventions = sorted({s["tokenization"] for s in scores.values() if isinstance(s, Mapping) and "tokenization" in s})
    if conventions:
        lines += [""] + [f"captions: {c}" for c in conventions]
    return "\n".join(lines)


def format_llava_bench(scores: Mapping, lang: str) -> str:
    """One LLaVA-Bench run: per category the relative score and both mean judge scores, the paper's relative
    scores beside (COCO set), and the questions left unjudged."""
    width = 36
    judge = scores["judge"]
    title = "COCO" if scores["set"] == "coco" else "In-the-Wild"
    lines = [
        f"LLaVA-Bench ({title}), {LANGUAGES[lang]}: judge {judge['model']}, {scores['n']} questions, "
        f"{scores['judged']} judged",
        f"{'':<{width}}" + "".join(f"{t:>14}" for _, t in LLAVA_CATEGORIES),
    ]
    present = {key: scores[key] for key, _ in LLAVA_CATEGORIES if key in scores}
    rows = (
        ("relative score", "relative", _ours),
        ("model mean", "model", lambda x: _ours(x, 2)),
        ("reference mean", "reference", lambda x: _ours(x, 2)),
        ("questions judged", "n", lambda x: "-" if x is None else str(x)),
    )
    for label, field, fmt in rows:
        lines.append(_llava_row(label, {k: v[field] for k, v in present.items()}, fmt, width))
    if scores["set"] == "coco":
        for model, published in LLAVA_PAPER[lang].items():
            lines.append(_llava_row(model, published, _cell, width))
    if scores["failed"]:
        unjudged = ", ".join(f"question {f['question_id']} ({f['error']})" for f in scores["failed"])
        lines.append(f"left out of the means, unjudged: {unjudged}")
    return "\n".join(lines)
