"""The bundled synthetic set's test split as a bilingual benchmark: VQA exact match (overall and by question
kind), caption CIDEr, grounding accuracy (IoU >= 0.5) and, for models with the stage-1 heads, ITC retrieval
IR@1/TR@1.

Examples are built on the fly from (seed, 'test', index) exactly as ziya_jax.data.synthetic defines them; the
annotation of example i for task t in language l draws from its own generator [seed, test, i, t, l], so every
score is a pure function of the model and (n, seed). Decoding is greedy; prompts are the training prompts.
Scores are x100.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ziya_jax.config import ModelConfig
from ziya_jax.data import formats, images, synthetic
from ziya_jax.decode import DecodeConfig
from ziya_jax.evaluate import captioning, grounding, inference, retrieval, text, vqa

TASKS = ("vqa", "caption", "grounding", "retrieval")
# Short answers share a decoder (a trained model stops at EOS, so the longer limit costs it little); captions
# need a longer one.
_DECODE_GROUPS = (("vqa", "grounding"), ("caption",))
_TASK_INDEX = {t: k for k, t in enumerate(formats.TASKS)}
_ROWS = (
    ("vqa_em", "VQA exact match"),
    *((f"vqa_em_{kind}", f"  {kind} questions") for kind in synthetic.VQA_KINDS),
    ("cider", "Caption CIDEr"),
    ("bleu4", "Caption BLEU-4"),
    ("grounding_acc", "Grounding acc (IoU>=0.5)"),
    ("retrieval_ir1", "Retrieval IR@1"),
    ("retrieval_tr1", "Retrieval TR@1"),
    ("retrieval_ir5", "Retrieval IR@5"),
    ("retrieval_tr5", "Retrieval TR@5"),
)


@dataclasses.dataclass
class _Example:
    query: str
    reference: str
    box: list | None = None
    kind: str | None = None  # VQA: the question's kind (synthetic.VQA_KINDS)


def _examples(scenes, task: str, lang: str, seed: int) -> list[_Example]:
    out = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, synthetic.SPLITS["test"], i, _TASK_INDEX[task], formats.LANGS.index(lang)])
        ann = synthetic.annotate(scene, task, lang, rng)
        turn = formats.conversation(task, ann).turns[0]
        out.append(_Example(turn.query, turn.answer, ann.get("box"), ann.get("kind")))
    return out


def max_new_tokens_for(tokenizer, references: Sequence[str]) -> int:
    """Room for the longest reference plus EOS, rounded up to 8 so nearby n share one compiled decoder."""
    longest = max(len(tokenizer.encode(r)) for r in references) + 1
    return inference.round_up(longest + 4, 8)


def evaluate_synthetic(
    params,
    cfg: ModelConfig,
    tokenizer,
    qformer_tokenizer,
    *,
    image_size: int,
    n: int = 200,
    batch_size: int = 32,
    seed: int = 0,
    langs=("en", "zh"),
    tasks=TASKS,
    show: int = 0,
    en_tokenizer: str = "auto",
) -> dict:
    """{lang: {'vqa_em', 'cider', 'bleu4', 'grounding_acc', 'retrieval_ir1', 'retrieval_tr1', ..., 'n'}} on the
    first n test examples (x100). Retrieval runs only when params hold the stage-1 heads (vision_proj, text_proj)
    and a Q-Former tokenizer is given; otherwise its keys are absent. 'predictions' holds every decoded
    {task, image, question, prediction, reference[, kind]}; show > 0 adds 'examples': that many of them per language,
    taken from the tasks in turn. 'image' is the test image's index (synthetic.generate("test", image, ...))."""
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"unknown synthetic tasks {sorted(unknown)}; known: {list(TASKS)}")
    if set(langs) - set(formats.LANGS) or not langs:
        raise ValueError(f"langs must be drawn from {formats.LANGS}, got {langs}")
    if n < 1:
        raise ValueError("n must be >= 1")
    scenes, pixels = [], []
    for i in range(n):
        image, scene = synthetic.generate("test", i, image_size, seed)
        scenes.append(scene)
        pixels.append(images.to_pixels(images.open_rgb(image), cfg.vision.image_size))
    results = {lang: {"n": n} for lang in langs}
    predicted = {lang: {} for lang in langs}
    groups = [g for g in (tuple(t for t in group if t in tasks) for group in _DECODE_GROUPS) if g]
    gen = inference.Generator(params, cfg, tokenizer, qformer_tokenizer, batch_size=batch_size) if groups else None
    for group in groups:  # one decoder program per group: both languages and the group's tasks in one call
        flat = [
            (task, lang, i, ex)
            for task in group
            for lang in langs
            for i, ex in enumerate(_examples(scenes, task, lang, seed))
        ]
        dc = DecodeConfig(max_new_tokens=max_new_tokens_for(tokenizer, [row[3].reference for row in flat]))
        preds = gen(
            [inference.Prompt(ex.query, pixels[i]) for _, _, i, ex in flat], dc, desc=f"synthetic {'+'.join(group)}"
        )
        for task in group:
            for lang in langs:
                rows = [(i, ex, p) for (t, lg, i, ex), p in zip(flat, preds) if (t, lg) == (task, lang)]
                predicted[lang][task] = [
                    {"task": task, "image": i, "question": ex.query, "prediction": p, "reference": ex.reference}
                    | ({"kind": ex.kind} if ex.kind else {})
                    for i, ex, p in rows
                ]
                rows = [(ex, p) for _, ex, p in rows]
                results[lang] |= _score(task, rows, lang, en_tokenizer)
    if "retrieval" in tasks and inference.has_itc_heads(params) and qformer_tokenizer is not None:
        stacked = np.stack(pixels)
        for lang in langs:
            captions = [ex.reference for ex in _examples(scenes, "caption", lang, seed)]
            sim, *_ = inference.itc_similarity(params, cfg, stacked, captions, qformer_tokenizer, batch_size=batch_size)
            recall = retrieval.recall_at_k(sim, np.arange(n), ks=(1, 5))
            results[lang] |= {f"retrieval_{d}{k}": recall[f"{d.upper()}@{k}"] for d in ("ir", "tr") for k in (1, 5)}
    for lang in langs:
        lists = [predicted[lang][t] for t in TASKS if t in predicted[lang]]
        if lists:
            results[lang]["predictions"] = [row for rows in lists for row in rows]
        if show:
            results[lang]["examples"] = [row for group in zip(*lists) for row in group][:show]
    return results


def _score(task: str, rows, lang: str, en_tokenizer: str) -> dict:
    if task == "vqa":
        hits = [(ex.kind, vqa.exact_match(p, ex.reference, lang)) for ex, p in rows]
        by_kind = {
            f"vqa_em_{kind}": vqa.mean(h for k, h in hits if k == kind)
            for kind in synthetic.VQA_KINDS
            if any(k == kind for k, _ in hits)
        }
        return {"vqa_em": vqa.mean(h for _, h in hits)} | by_kind
    if task == "grounding":
        return {"grounding_acc": vqa.mean(grounding.grounding_hit(p, ex.box) for ex, p in rows)}
    scores = captioning.caption_scores(
        {str(k): [ex.reference] for k, (ex, _) in enumerate(rows)},
        {str(k): p for k, (_, p) in enumerate(rows)},
        lang,
        en_tokenizer=en_tokenizer,
    )
    return {"cider": scores["CIDEr"], "bleu4": scores["BLEU-4"]}


def format_table(results: dict) -> str:
    """The bilingual table of evaluate_synthetic's results (metrics as rows, languages as columns), with the
    caption tokenisation conventions and any examples below it."""
    langs = list(results)
    n = {results[lang].get("n") for lang in langs}
    title = f"Synthetic test split (n={n.pop() if len(n) == 1 else sorted(n)} per language, greedy, x100)"
    width = max(len(label) for _, label in _ROWS) + 2
    lines = [title, f"{'':<{width}}" + "".join(f"{lang:>10}" for lang in langs)]
    for key, label in _ROWS:
        if any(key in results[lang] for lang in langs):
            cells = "".join(f"{results[lang][key]:>10.1f}" if key in results[lang] else f"{'-':>10}" for lang in langs)
            lines.append(f"{label:<{width}}{cells}")
    if any("cider" in results[lang] for lang in langs):
        lines += [f"captions ({lang}): {text.CONVENTIONS[lang]}" for lang in langs if "cider" in results[lang]]
    for lang in langs:
        for ex in results[lang].get("examples", []):
            lines.append(f"[{lang} {ex['task']}] {ex['question']!r} -> {ex['prediction']!r} (ref {ex['reference']!r})")
    return "\n".join(lines)
