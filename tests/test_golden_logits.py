"""ziya_jax logits vs transformers on the same (converted) weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_hf_model, make_inputs, to_jax_pixels

from ziya_jax.convert import load_hf
from ziya_jax.model import ZiyaVisual

CASES = {
    "blip2-gqa-rope5000": dict(kind="blip2", num_kv_heads=2, rope_theta=5000.0),
    "blip2-mha-freq1": dict(kind="blip2", num_kv_heads=4, cross_attention_frequency=1),
    "instructblip-gqa-rope500000": dict(kind="instructblip", num_kv_heads=1, rope_theta=500000.0),
    "instructblip-mha-tied": dict(kind="instructblip", num_kv_heads=4, tie_word_embeddings=True),
}


def hf_logits(model, kind, ids, mask, pixels, qids, qmask, images_per_row=1):
    kwargs = {}
    if kind == "instructblip":  # HF wants one instruction per image
        kwargs = dict(
            qformer_input_ids=qids.repeat_interleave(images_per_row, 0),
            qformer_attention_mask=qmask.repeat_interleave(images_per_row, 0),
        )
    with torch.no_grad():
        return model(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits.numpy()


def ours(params, cfg, ids, mask, pixels, qids, qmask):
    return np.asarray(
        jax.jit(ZiyaVisual(cfg).apply)(
            {"params": params},
            jnp.asarray(ids.numpy()),
            jnp.asarray(mask.numpy()),
            jnp.asarray(to_jax_pixels(pixels, ids.shape[0])),
            jnp.asarray(qids.numpy()),
            jnp.asarray(qmask.numpy()),
        )
    )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("images_per_row", [1, 2])
def test_logits_match_transformers(case, images_per_row, tmp_path):
    spec = dict(CASES[case])
    kind = spec["kind"]
    model = make_hf_model(**spec)
    model.save_pretrained(tmp_path / "hf")
    params, cfg = load_hf(str(tmp_path / "hf"))
    assert cfg.variant == ("chat" if kind == "instructblip" else "base")

    inputs = make_inputs(batch=2, images_per_row=images_per_row)
    ref = hf_logits(model, kind, *inputs, images_per_row=images_per_row)
    got = ours(params, cfg, *inputs)
    valid = inputs[1].numpy().astype(bool)
    assert valid.sum() < valid.size  # the batch really has padding
    err = np.abs(got - ref)[valid].max()
    assert err <= 1e-4, f"max |logits diff| {err}"

    # The image really reaches the logits (so the comparison above is not vacuous).
    ids, mask, pixels, qids, qmask = inputs
    other = ours(params, cfg, ids, mask, pixels + 1.0, qids, qmask)
    assert np.abs(other - got)[valid].max() > 1e-3
