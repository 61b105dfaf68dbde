"""The benchmark tasks: read a data set (`datasets`), ask the model (`inference`), score (`captioning`, `vqa`,
`retrieval`). `run_task` returns per-example prediction records and the scores dict."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from ziya_jax.data import formats
from ziya_jax.data.images import load_image
from ziya_jax.decode import DecodeConfig
from ziya_jax.evaluate import captioning, datasets, inference, retrieval, vqa


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # caption | vqa | exact | choice | vizwiz | retrieval
    lang: str
    reader: object
    split: str
    max_new_tokens: int


TASKS = {
    "nocaps": Task("caption", "en", datasets.read_nocaps, "val", 40),
    "flickr30k": Task("caption", "en", datasets.read_karpathy, "test", 40),
    "coco_cn": Task("caption", "zh", datasets.read_coco_cn, "test", 40),
    "flickr30k_cna": Task("caption", "zh", datasets.read_flickr30k_cna, "test", 40),
    "vqav2": Task("vqa", "en", datasets.read_vqa, "val2014", 10),
    "okvqa": Task("vqa", "en", functools.partial(datasets.read_vqa, okvqa=True), "val2014", 10),
    "gqa": Task("exact", "en", datasets.read_gqa, "testdev", 10),
    "scienceqa_img": Task("choice", "en", datasets.read_scienceqa, "test", 0),
    "vizwiz": Task("vizwiz", "en", datasets.read_vizwiz, "val", 10),
    "retrieval": Task("retrieval", "zh", datasets.read_captions, "test", 0),
}
# Tasks whose translated (Chinese) versions the paper reports: same files, questions/answers in Chinese.
TRANSLATABLE = ("vqav2", "gqa")
PROMPTS = {
    "vqa": {
        "en": "{question} Answer the question using a single word or phrase.",
        "zh": "{question} 请用一个词或短语回答。",
    },
    "vizwiz": {
        "en": "{question} When the image does not answer the question, reply 'unanswerable'. "
        "Answer the question using a single word or phrase."
    },
    "choice": {"en": "{context}{question}\nOptions: {options}\nAnswer with the option's letter."},
}
LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass
class Settings:
    """How to ask the model: decoding, batching, prompt override and metric options."""

    batch_size: int = 32
    decode: DecodeConfig | None = None  # None: greedy with the task's max_new_tokens
    prompt: str | None = None  # a template with {question}
    lang: str | None = None  # None: the task's language
    itm_top_k: int = 0
    en_tokenizer: str = "auto"
    meteor: bool = False
    workers: int = 8  # image decoding threads


def output_name(task: str, lang: str, data_name: str = "") -> str:
    if task == "retrieval":
        return f"retrieval_{data_name}" if data_name else "retrieval"
    return f"{task}_zh" if task in TRANSLATABLE and lang == "zh" else task


def load_items(
    task: str,
    data: str,
    image_dir: str | None,
    split: str | None,
    limit: int | None,
    allow_any_image_path: bool = False,
):
    """The task's examples (checked, see `datasets`); an empty set is refused, as it has no score."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)} and synthetic")
    spec = TASKS[task]
    items = spec.reader(data, image_dir, split or spec.split, allow_any_image_path=allow_any_image_path)
    if not items:
        raise ValueError(f"{data}: no {task} examples in split {split or spec.split!r}; nothing to evaluate")
    return items[:limit] if limit else items


def _pixels(items, size: int, workers: int) -> list[np.ndarray]:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(
            tqdm(
                pool.map(lambda it: load_image(it.image, size), items),
                total=len(items),
                desc="images",
                unit="img",
                leave=False,
            )
        )


def run_task(task: str, items: Sequence, params, cfg, tokenizer, qformer_tokenizer, settings: Settings):
    """-> (records: one dict per example with its prediction, scores: dict)."""
    spec = TASKS[task]
    lang = settings.lang or spec.lang
    if lang != spec.lang and task not in TRANSLATABLE + ("retrieval",):
        raise ValueError(f"task {task} is {spec.lang} only (translated versions exist for {list(TRANSLATABLE)})")
    pixels = _pixels(items, cfg.vision.image_size, settings.workers)
    if spec.kind == "retrieval":
        return _retrieval(items, pixels, params, cfg, qformer_tokenizer, settings)
    gen = inference.Generator(params, cfg, tokenizer, qformer_tokenizer, batch_size=settings.batch_size)
    if spec.kind == "choice":
        return _choice(items, pixels, gen, settings)
    dc = settings.decode or DecodeConfig(max_new_tokens=spec.max_new_tokens)
    if spec.kind == "caption":
        prompt = settings.prompt or formats.PROMPTS["caption"][lang]
        preds = gen([inference.Prompt(prompt, p) for p in pixels], dc, desc=task)
        refs = {it.id: it.references for it in items}
        scores = captioning.caption_scores(
            refs,
            {it.id: p for it, p in zip(items, preds)},
            lang,
            en_tokenizer=settings.en_tokenizer,
            meteor=settings.meteor,
        )
        domains = sorted({it.meta["domain"] for it in items if "domain" in it.meta})
        for d in domains:  # NoCaps reports in-, near- and out-of-domain CIDEr too
            sub = [(it, p) for it, p in zip(items, preds) if it.meta.get("domain") == d]
            scores[f"CIDEr_{d}"] = captioning.caption_scores(
                {it.id: it.references for it, _ in sub},
                {it.id: p for it, p in sub},
                lang,
                bleu=False,
                en_tokenizer=settings.en_tokenizer,
            )["CIDEr"]
        records = [
            {"id": it.id, "image": it.image, "prediction": p, "references": it.references}
            for it, p in zip(items, preds)
        ]
        return records, scores | {"n": len(items)}
    template = settings.prompt or PROMPTS["vizwiz" if spec.kind == "vizwiz" else "vqa"][lang]
    queries = [template.format(question=it.question) for it in items]
    preds = gen([inference.Prompt(q, p) for q, p in zip(queries, pixels)], dc, desc=task)
    records, per_type = [], {}
    for it, pred in zip(items, preds):
        if spec.kind == "exact":
            score = float(vqa.exact_match(pred, it.answers[0], lang))
        else:
            answer = vqa.vizwiz_answer(pred) if spec.kind == "vizwiz" else pred
            score = vqa.vqa_accuracy(answer, it.answers, lang)
        per_type.setdefault(it.meta.get("answer_type") or "all", []).append(score)
        records.append(
            {"id": it.id, "question": it.question, "prediction": pred, "answers": it.answers, "score": score}
        )
    scores = {"accuracy": vqa.mean(r["score"] for r in records), "n": len(records)}
    if len(per_type) > 1:
        scores |= {f"accuracy_{t}": vqa.mean(v) for t, v in sorted(per_type.items())}
    return records, scores


def _choice(items, pixels, gen: inference.Generator, settings: Settings):
    """ScienceQA: the prediction is the choice whose letter (+ EOS) the model finds most likely."""
    template = settings.prompt or PROMPTS["choice"]["en"]
    prompts, letters = [], []
    for it, px in zip(items, pixels):
        if len(it.choices) > len(LETTERS):
            raise ValueError(f"problem {it.id} has {len(it.choices)} choices; at most {len(LETTERS)} are lettered")
        options = " ".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(it.choices))
        context = f"Context: {it.context}\n" if it.context else ""
        query = template.format(context=context, question=it.question, options=options)
        prompts.append(inference.Prompt(query, px))
        letters.append(list(LETTERS[: len(it.choices)]))
    logps = gen.choice_logprobs(prompts, letters)
    records = []
    for it, lp in zip(items, logps):
        pick = int(np.argmax(lp))
        records.append(
            {
                "id": it.id,
                "question": it.question,
                "choices": it.choices,
                "prediction": pick,
                "answer": it.answer,
                "logprobs": lp,
                "score": float(pick == it.answer),
            }
        )
    return records, {"accuracy": vqa.mean(r["score"] for r in records), "n": len(records)}


def _retrieval(items, pixels, params, cfg, qformer_tokenizer, settings: Settings):
    texts = [r for it in items for r in it.references]
    text_image = [i for i, it in enumerate(items) for _ in it.references]
    sim, ids, mask, embeds = inference.itc_similarity(
        params,
        cfg,
        np.stack(pixels),
        texts,
        qformer_tokenizer,
        batch_size=settings.batch_size,
        keep_image_embeds=settings.itm_top_k > 0,
    )
    if settings.itm_top_k > 0:
        scorer = inference.itm_scorer(params, cfg, embeds, ids, mask, settings.batch_size)
        i2t, t2i = retrieval.rerank(sim, settings.itm_top_k, scorer)
        scores = retrieval.recall_reranked(i2t, t2i, text_image)
    else:
        scores = retrieval.recall_at_k(sim, text_image)
    best_texts = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    records = [
        {"id": it.id, "image": it.image, "references": it.references, "top_texts": [texts[j] for j in best_texts[i]]}
        for i, it in enumerate(items)
    ]
    return records, scores | {"n_images": len(items), "n_texts": len(texts), "itm_top_k": settings.itm_top_k}
