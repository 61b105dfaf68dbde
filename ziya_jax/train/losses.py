"""Training losses, pure functions of arrays and parameters.

Stage 1 (BLIP-2 Q-Former pre-training): ITC, ITM with hard negatives, ITG. Stages 2 and 3: the LLM's next-token
loss on answer tokens only. Under jit with a sharded batch the batch axis is global, so ITC's and ITM's
negatives already come from every data-parallel shard (GSPMD inserts the gathers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ziya_jax.model import ZiyaVisual


def cross_entropy(logits, labels, mask=None, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy over positions where mask is set (float32), with label smoothing."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def lm_loss(logits, input_ids, loss_mask):
    """Next-token loss: logits at t predict input_ids at t+1, counted where loss_mask[t+1] (answers + EOS)."""
    return cross_entropy(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def itc_similarities(image_feats, text_feats, temp):
    """image_feats [B, Q, D], text_feats [B, D] (both L2-normalised) -> (sim_i2t, sim_t2i) [B, B]:
    the best-matching query per pair, over the temperature."""
    sim = jnp.einsum("iqd,td->itq", image_feats, text_feats).max(-1)
    return sim / temp, sim.T / temp


def itc_loss(sim_i2t, sim_t2i, label_smoothing: float = 0.1):
    labels = jnp.arange(sim_i2t.shape[0])
    return (
        cross_entropy(sim_i2t, labels, label_smoothing=label_smoothing)
        + cross_entropy(sim_t2i, labels, label_smoothing=label_smoothing)
    ) / 2


def hard_negatives(rng, sim):
    """For each row, one column drawn from softmax(sim) with the diagonal (the positive) excluded."""
    logits = jnp.where(jnp.eye(sim.shape[0], dtype=bool), -jnp.inf, sim)
    return jax.random.categorical(rng, jax.lax.stop_gradient(logits), axis=-1)


def _l2_normalise(x):
    return x / jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)


def _stage1(
    module: ZiyaVisual, pixel_values, text_ids, text_mask, rng, dec_token_id: int, names: tuple, deterministic: bool
):
    """The requested ones of ITC, ITM, ITG for (image, caption) pairs; text_ids start with the CLS token."""
    q = module.cfg.num_query_tokens
    image_embeds = module.vision_model(pixel_values, deterministic)
    queries = jnp.broadcast_to(module.query_tokens, (pixel_values.shape[0], *module.query_tokens.shape[1:]))
    losses = {}
    if "itc" in names or "itm" in names:
        query_out = module.qformer(queries, None, None, image_embeds, "bidirectional", deterministic)
        text_out = module.qformer(None, text_ids, text_mask, None, "bidirectional", deterministic)
        image_feats = _l2_normalise(module.vision_proj(query_out))
        text_feats = _l2_normalise(module.text_proj(text_out[:, 0]))
        sim_i2t, sim_t2i = itc_similarities(image_feats, text_feats, module.temp)
        losses["itc"] = itc_loss(sim_i2t, sim_t2i)
    if "itm" in names:
        rng_img, rng_txt = jax.random.split(rng)
        neg_image = hard_negatives(rng_img, sim_t2i)  # per text, an image
        neg_text = hard_negatives(rng_txt, sim_i2t)  # per image, a text
        itm_images = jnp.concatenate([image_embeds, image_embeds[neg_image], image_embeds])
        itm_text = jnp.concatenate([text_ids, text_ids, text_ids[neg_text]])
        itm_mask = jnp.concatenate([text_mask, text_mask, text_mask[neg_text]])
        itm_out = module.qformer(
            jnp.concatenate([queries] * 3), itm_text, itm_mask, itm_images, "bidirectional", deterministic
        )
        b = text_ids.shape[0]
        itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
        losses["itm"] = cross_entropy(module.itm_head(itm_out[:, :q]).mean(1), itm_labels)
    if "itg" in names:
        dec_ids = text_ids.at[:, 0].set(dec_token_id)
        itg_out = module.qformer(queries, dec_ids, text_mask, image_embeds, "causal_text", deterministic)
        text_logits = module.qformer.text_logits(itg_out[:, q:])
        losses["itg"] = cross_entropy(text_logits[:, :-1], dec_ids[:, 1:], text_mask[:, 1:], label_smoothing=0.1)
    return losses


def stage1_losses(params, cfg, batch, rng, dec_token_id: int, names=("itc", "itm", "itg"), deterministic: bool = False):
    """The requested losses of {'itc', 'itm', 'itg'} for batch {'pixel_values' [B, H, W, 3], 'text_ids',
    'text_mask' [B, T]}; unrequested ones are not computed."""
    unknown = set(names) - {"itc", "itm", "itg"}
    if unknown:
        raise ValueError(f"unknown stage-1 losses {sorted(unknown)}")
    rng_neg, rng_drop = jax.random.split(rng)
    return ZiyaVisual(cfg).apply(
        {"params": params},
        batch["pixel_values"],
        batch["text_ids"],
        batch["text_mask"],
        rng_neg,
        dec_token_id,
        tuple(names),
        deterministic,
        method=_stage1,
        rngs={"dropout": rng_drop},
    )


def instruction_losses(params, cfg, batch, rng, deterministic: bool = False):
    """{'lm'} for an instruction batch (input_ids, attention_mask, loss_mask, pixel_values [, qformer_ids/mask]
    [, positions, segment_ids when rows are packed])."""
    logits = ZiyaVisual(cfg).apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch.get("qformer_ids"),
        batch.get("qformer_mask"),
        batch.get("positions"),
        deterministic=deterministic,
        segment_ids=batch.get("segment_ids"),
        rngs={"dropout": rng},
    )
    return {"lm": lm_loss(logits, batch["input_ids"], batch["loss_mask"])}


__all__ = [
    "cross_entropy",
    "lm_loss",
    "itc_similarities",
    "itc_loss",
    "hard_negatives",
    "stage1_losses",
    "instruction_losses",
]
