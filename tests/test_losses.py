"""Each loss against a straightforward numpy reference on small inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ziya_jax.config import ModelConfig, load_config
from ziya_jax.model import init_params
from ziya_jax.train.losses import cross_entropy, hard_negatives, itc_loss, itc_similarities, lm_loss, stage1_losses


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_ce(logits, labels, smoothing=0.0):
    logp = np_log_softmax(logits)
    k = logits.shape[-1]
    target = np.full(logits.shape, smoothing / k)
    target[np.arange(len(labels)), labels] += 1 - smoothing
    return -(target * logp).sum(-1)


def test_cross_entropy_with_smoothing_and_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 9)).astype(np.float32)
    labels = rng.integers(0, 9, 6)
    mask = np.array([1, 0, 1, 1, 0, 1])
    ref = (np_ce(logits, labels, 0.1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(
        cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), 0.1), ref, rtol=1e-5
    )


def test_lm_loss_counts_only_masked_next_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    loss_mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    terms = [
        np_ce(logits[b, t - 1 : t], ids[b, t : t + 1])[0] for b in range(2) for t in range(1, 5) if loss_mask[b, t]
    ]
    np.testing.assert_allclose(
        lm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(loss_mask)), np.mean(terms), rtol=1e-5
    )


def test_itc_matches_numpy():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(4, 3, 5))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt = rng.normal(size=(4, 5))
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    temp = 0.07
    sim = np.array([[max(img[i, q] @ txt[t] for q in range(3)) for t in range(4)] for i in range(4)]) / temp
    ref = (np_ce(sim, np.arange(4), 0.1).mean() + np_ce(sim.T, np.arange(4), 0.1).mean()) / 2
    i2t, t2i = itc_similarities(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), temp)
    np.testing.assert_allclose(i2t, sim, rtol=1e-5)
    np.testing.assert_allclose(itc_loss(i2t, t2i), ref, rtol=1e-5)


def test_hard_negatives_follow_similarity_and_skip_positive():
    sim = jnp.array([[5.0, 4.0, -9.0], [0.0, 5.0, 0.0], [-9.0, 4.0, 5.0]])
    draws = np.stack([np.asarray(hard_negatives(jax.random.key(s), sim)) for s in range(400)])
    assert (draws != np.arange(3)).all()  # never the positive
    assert (draws[:, 0] == 1).mean() > 0.99  # softmax over {4, -9} picks 1
    assert abs((draws[:, 1] == 0).mean() - 0.5) < 0.1  # {0, 0}: even


@pytest.mark.slow
def test_stage1_losses_are_finite_and_reach_the_qformer():
    cfg = ModelConfig.from_dict(load_config("configs/tiny.py:stage=1").model.to_dict())
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(3)
    batch = {
        "pixel_values": jnp.asarray(rng.normal(size=(4, 28, 28, 3)), jnp.float32),
        "text_ids": jnp.asarray(rng.integers(3, 90, (4, 6)), jnp.int32),
        "text_mask": jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] * 3 + [0] * 3]),
    }

    def loss_fn(p):
        losses = stage1_losses(p, cfg, batch, jax.random.key(1), dec_token_id=1)
        return sum(losses.values()), losses

    (_, losses), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert set(losses) == {"itc", "itm", "itg"} and all(np.isfinite(float(v)) for v in losses.values())
    # Near chance at init: ITM is a 2-way decision, ITG a vocab-wide one.
    assert abs(float(losses["itm"]) - np.log(2)) < 0.3
    for part in ("query_tokens", "vision_proj", "text_proj", "itm_head", "temp"):
        assert float(jnp.abs(jax.tree_util.tree_leaves(grads[part])[0]).max()) > 0, part
    assert float(jnp.abs(grads["qformer"]["word_embeddings"]["embedding"]).max()) > 0
