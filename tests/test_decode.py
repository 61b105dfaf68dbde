"""Greedy and beam decoding vs transformers' generate on the same converted weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import IMAGE_TOKEN, NUM_QUERIES, make_hf_model, to_jax_pixels

from ziya_jax.convert import load_hf
from ziya_jax.decode import DecodeConfig, decode_params, generate

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

PAD = 0


def prompts(batch, seed=0):
    """Left-padded prompts of different lengths: [pad..][image placeholders][text]."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5][:batch]
    width = NUM_QUERIES + max(lengths)
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.cat([torch.full((NUM_QUERIES,), IMAGE_TOKEN), torch.randint(3, 120, (n,), generator=g)])
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    pixels = torch.randn(batch, 3, 28, 28, generator=g)
    qids = torch.randint(1, 100, (batch, 5), generator=g)
    return ids, mask, pixels, qids, torch.ones_like(qids)


def hf_new_tokens(model, kind, ids, mask, pixels, qids, qmask, **kwargs):
    extra = dict(qformer_input_ids=qids, qformer_attention_mask=qmask) if kind == "instructblip" else {}
    with torch.no_grad():
        out = model.generate(
            pixel_values=pixels,
            input_ids=ids,
            attention_mask=mask,
            pad_token_id=PAD,
            do_sample=False,
            **extra,
            **kwargs,
        )
    return out[:, ids.shape[1] :].numpy()


def rows(tokens, lengths):
    return [list(t[:n]) for t, n in zip(tokens, lengths)]


def hf_rows(new, eos):
    """HF output rows cut after the first EOS (HF pads finished rows afterwards)."""
    out = []
    for r in new:
        r = list(r)
        out.append(r[: r.index(eos) + 1] if eos in r else r)
    return out


@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_and_beam_match_transformers(kind, batch, tmp_path):
    model = make_hf_model(kind, num_kv_heads=2, rope_theta=5000.0)
    model.save_pretrained(tmp_path / "hf")
    stacked, cfg = load_hf(str(tmp_path / "hf"))
    params = decode_params(stacked)  # per-layer weights, the fast path; the stacked ones are checked below
    ids, mask, pixels, qids, qmask = prompts(batch)
    ours_inputs = dict(
        pixel_values=jnp.asarray(to_jax_pixels(pixels, batch)),
        qformer_ids=jnp.asarray(qids.numpy()),
        qformer_mask=jnp.asarray(qmask.numpy()),
    )
    n_new = 8
    # EOS chosen so it is actually reached early: the third token the model emits greedily without one.
    free = hf_new_tokens(model, kind, ids, mask, pixels, qids, qmask, max_new_tokens=n_new, eos_token_id=None)
    early_eos = int(free[0, 2])
    results = {}
    for eos in (early_eos, 126):
        for beams in (1, 4):
            dc = DecodeConfig(
                max_new_tokens=n_new, num_beams=beams, length_penalty=1.0, eos_token_id=eos, pad_token_id=PAD
            )
            tokens, lengths = generate(params, cfg, ids.numpy(), mask.numpy(), dc=dc, **ours_inputs)
            ref = hf_new_tokens(
                model,
                kind,
                ids,
                mask,
                pixels,
                qids,
                qmask,
                max_new_tokens=n_new,
                num_beams=beams,
                length_penalty=1.0,
                eos_token_id=eos,
            )
            assert rows(tokens, lengths) == hf_rows(ref, eos), (eos, beams)
            results[eos, beams] = rows(tokens, lengths)
            assert (tokens[np.arange(n_new)[None] >= lengths[:, None]] == PAD).all()
    assert results[126, 1] != results[126, 4]  # beam search really searched
    dc = DecodeConfig(max_new_tokens=n_new, num_beams=4, eos_token_id=126, pad_token_id=PAD)
    assert rows(*generate(stacked, cfg, ids.numpy(), mask.numpy(), dc=dc, **ours_inputs)) == results[126, 4]
    # The early EOS really stopped at least one row early.
    dc = DecodeConfig(max_new_tokens=n_new, eos_token_id=early_eos, pad_token_id=PAD)
    assert generate(params, cfg, ids.numpy(), mask.numpy(), dc=dc, **ours_inputs)[1].min() < n_new


def test_logit_processors_against_numpy():
    from ziya_jax.decode import process_logits

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50)).astype(np.float32) * 3
    seen = np.zeros((2, 50), bool)
    seen[0, [3, 7]] = True
    dc = DecodeConfig(
        do_sample=True, temperature=0.7, top_k=10, top_p=0.5, repetition_penalty=1.3, min_new_tokens=2, eos_token_id=5
    )
    got = np.asarray(process_logits(jnp.asarray(logits), jnp.asarray(seen), 1, dc))

    ref = logits.copy()
    ref[seen] = np.where(ref[seen] < 0, ref[seen] * 1.3, ref[seen] / 1.3)
    ref[:, 5] = -np.inf  # step 1 < min_new_tokens
    ref = ref / 0.7
    for row in ref:
        order = np.argsort(-row)
        row[order[10:]] = -np.inf  # top-k
        probs = np.exp(row[order] - row[order[0]])
        probs /= probs.sum()
        # top-p: keep the smallest prefix of the sorted tokens whose probability mass reaches 0.5
        keep = np.searchsorted(np.cumsum(probs), 0.5) + 1
        row[order[keep:]] = -np.inf
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)


def test_sampling_tiny_top_p_is_greedy_and_no_recompile(tmp_path):
    from ziya_jax.decode import _search

    model = make_hf_model("blip2")
    model.save_pretrained(tmp_path / "hf")
    params, cfg = load_hf(str(tmp_path / "hf"))
    ids, mask, pixels, _, _ = prompts(3)
    pix = jnp.asarray(to_jax_pixels(pixels, 3))
    greedy = generate(params, cfg, ids.numpy(), mask.numpy(), pix, dc=DecodeConfig(max_new_tokens=6, eos_token_id=126))
    sample = DecodeConfig(max_new_tokens=6, eos_token_id=126, do_sample=True, temperature=0.7, top_p=1e-6)
    compiled = _search._cache_size()
    for seed in range(3):
        out = generate(params, cfg, ids.numpy(), mask.numpy(), pix, dc=sample, rng=jax.random.key(seed))
        np.testing.assert_array_equal(out[0], greedy[0])
    assert _search._cache_size() == compiled + 1  # one compilation for the three requests
    # Real sampling (top_p 1, high temperature) does vary with the seed.
    wild = DecodeConfig(max_new_tokens=6, eos_token_id=126, do_sample=True, temperature=5.0)
    draws = {
        tuple(generate(params, cfg, ids.numpy(), mask.numpy(), pix, dc=wild, rng=jax.random.key(s))[0][0])
        for s in range(4)
    }
    assert len(draws) > 1


def test_placeholder_count_must_match_images(tmp_path):
    model = make_hf_model("blip2")
    model.save_pretrained(tmp_path / "hf")
    params, cfg = load_hf(str(tmp_path / "hf"))
    ids, mask, pixels, _, _ = prompts(1)
    two_images = np.concatenate([to_jax_pixels(pixels, 1)] * 2, axis=1)  # 2 images, placeholders for 1
    with pytest.raises(ValueError, match="image placeholders"):
        generate(params, cfg, ids.numpy(), mask.numpy(), two_images, dc=DecodeConfig(max_new_tokens=2))
