"""Image-text retrieval: recall@K both ways from a similarity matrix, and the BLIP-2 way of getting one (ITC
similarity: the best-matching query per pair; optional ITM re-ranking of each query's top K).

Ranks are pessimistic: a candidate that ties with the best correct one counts as ranked above it, so a model
whose scores are all equal gets no credit."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(sim: np.ndarray, text_image: Sequence[int], ks=(1, 5, 10)) -> dict:
    """sim [images, texts]; text_image[t] = the image of text t. -> {'TR@k': image->text, 'IR@k': text->image},
    x100. An image is a hit at k if any of its texts is within its top k; a text if its image is."""
    sim = np.asarray(sim, np.float64)
    text_image = np.asarray(text_image)
    n_img, n_txt = sim.shape
    if text_image.shape != (n_txt,) or (n_txt and (text_image.min() < 0 or text_image.max() >= n_img)):
        raise ValueError(f"text_image must give an image index in [0, {n_img}) for each of the {n_txt} texts")
    own = text_image[None, :] == np.arange(n_img)[:, None]  # [images, texts]
    if not own.any(1).all():
        raise ValueError("every image needs at least one text")
    best = np.where(own, sim, -np.inf).max(1, keepdims=True)
    tr_rank = np.sum(~own & (sim >= best), axis=1)  # wrong texts scoring at least the best right one
    right = sim[text_image, np.arange(n_txt)]
    ir_rank = np.sum((sim >= right[None, :]) & ~own, axis=0)
    out = {}
    for k in ks:
        out[f"TR@{k}"] = 100.0 * float(np.mean(tr_rank < k))
    for k in ks:
        out[f"IR@{k}"] = 100.0 * float(np.mean(ir_rank < k))
    out["R_mean"] = float(np.mean([out[f"TR@{k}"] for k in ks] + [out[f"IR@{k}"] for k in ks]))
    return out


def rerank(sim: np.ndarray, top_k: int, pair_score) -> tuple[np.ndarray, np.ndarray]:
    """(i2t, t2i) score matrices in which each row's ITC top_k candidates get ITC + pair_score(images, texts)
    (the ITM logit) and every other candidate ranks below them, as LAVIS re-ranks BLIP-2 retrieval."""
    sim = np.asarray(sim, np.float64)
    floor = sim.min() - 1.0 - 1e3 * (np.abs(sim).max() + 1.0)
    i2t = np.full(sim.shape, floor)
    t2i = np.full(sim.shape, floor)
    k_t, k_i = min(top_k, sim.shape[1]), min(top_k, sim.shape[0])
    top_t = np.argsort(-sim, axis=1, kind="stable")[:, :k_t]  # [images, k]
    imgs = np.repeat(np.arange(sim.shape[0]), k_t)
    scores = pair_score(imgs, top_t.reshape(-1))
    i2t[imgs, top_t.reshape(-1)] = sim[imgs, top_t.reshape(-1)] + scores
    top_i = np.argsort(-sim, axis=0, kind="stable")[:k_i]  # [k, texts]
    txts = np.tile(np.arange(sim.shape[1]), k_i)
    scores = pair_score(top_i.reshape(-1), txts)
    t2i[top_i.reshape(-1), txts] = sim[top_i.reshape(-1), txts] + scores
    return i2t, t2i


def recall_reranked(i2t: np.ndarray, t2i: np.ndarray, text_image: Sequence[int], ks=(1, 5, 10)) -> dict:
    """Recall when image->text and text->image use different score matrices (after `rerank`)."""
    tr = recall_at_k(i2t, text_image, ks)
    ir = recall_at_k(t2i, text_image, ks)
    out = {f"TR@{k}": tr[f"TR@{k}"] for k in ks} | {f"IR@{k}": ir[f"IR@{k}"] for k in ks}
    out["R_mean"] = float(np.mean(list(out.values())))
    return out
