"""Properties of the modules: bf16 vs f32, KV cache, LoRA, remat and unrolled scans, Q-Former attention modes,
positions."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ziya_jax.config import ModelConfig, load_config
from ziya_jax.decode import decode_params
from ziya_jax.model import ZiyaVisual, abstract_params, default_positions, init_params
from ziya_jax.model.layers import lora_adapters, matmul, merge_lora, unmerge_lora
from ziya_jax.model.llama import init_cache
from ziya_jax.model.qformer import QFormer
from ziya_jax.model.vit import VisionTransformer


def tiny(arg="variant=chat,stage=3", **changes):
    cfg = ModelConfig.from_dict(load_config(f"configs/tiny.py:{arg}").model.to_dict())
    return dataclasses.replace(cfg, **changes)


def inputs(cfg, batch=2, text=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 120, (batch, cfg.num_query_tokens + text)).astype(np.int32)
    ids[:, : cfg.num_query_tokens] = cfg.image_token_id
    mask = np.ones_like(ids)
    mask[-1, -2:] = 0
    pixels = rng.normal(size=(batch, 1, 28, 28, 3)).astype(np.float32)
    qids = rng.integers(1, 90, (batch, 5)).astype(np.int32)
    return tuple(map(jnp.asarray, (ids, mask, pixels, qids, np.ones_like(qids))))


def perturbed_params(cfg, seed=0):
    """Random values for every parameter (LoRA B included, norm scales near 1), so every parameter matters.
    Drawn with numpy from the abstract shapes: no init to compile."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(abstract_params(cfg))
    draw = lambda path, a: jnp.asarray(
        rng.normal(0.0, 0.2, a.shape).astype(a.dtype) + ("scale" in jax.tree_util.keystr(path))
    )
    return jax.tree_util.tree_map_with_path(draw, abstract)


def logits(cfg, params, args):
    return np.asarray(jax.jit(ZiyaVisual(cfg).apply)({"params": params}, *args))


def test_bf16_compute_close_to_f32():
    cfg = tiny()
    params = perturbed_params(cfg)
    args = inputs(cfg)
    f32 = logits(cfg, params, args)
    bf16 = logits(dataclasses.replace(cfg, dtype="bfloat16"), params, args)
    valid = np.asarray(args[1]).astype(bool)
    err = np.abs(bf16 - f32)[valid].max() / np.abs(f32[valid]).max()
    # Stated tolerance: bf16 compute (f32 params, f32 softmax/norm statistics) within 3% of the logit scale.
    assert err < 0.03, err
    assert err > 0  # bf16 was really used


def test_matmul_gradients_equal_autodiff():
    """The hand-written backward of layers.matmul against autodiff of the plain product (float32), and in bfloat16
    its outputs and gradients stay within bfloat16 rounding of those."""
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 5, 16), (16, 12)))
    ct = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
    plain = lambda x, w: jnp.vdot(x @ w, ct)
    ours = lambda x, w: jnp.vdot(matmul(x, w).astype(jnp.float32), ct)
    want = jax.grad(plain, argnums=(0, 1))(x, w)
    for got, ref in zip(jax.grad(ours, argnums=(0, 1))(x, w), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert matmul(xb, wb).dtype == jnp.bfloat16
    for got, ref in zip(jax.grad(ours, argnums=(0, 1))(xb, wb), want):
        assert got.dtype == jnp.bfloat16
        assert np.abs(np.asarray(got, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("unrolled", [False, True])
def test_kv_cache_decode_equals_full_forward(unrolled):
    """Prefill + cached steps equal the full (scanned) forward; unrolled: on decode_params' per-layer weights of
    the ViT, the Q-Former and the LLM, LoRA included (stage-3 config and a Q-Former target, every LoRA B
    non-zero)."""
    cfg = tiny()
    qformer_target = r"qformer/layer/layer_0/crossattention/attention/(query|value)"
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, targets=(*cfg.lora.targets, qformer_target)))
    params = perturbed_params(cfg)
    model = ZiyaVisual(cfg)
    decoder, decoder_params = (ZiyaVisual(cfg, unrolled=True), decode_params(params)) if unrolled else (model, params)
    ids, _, pixels, qids, qmask = inputs(cfg, text=8)
    # Left-pad row 0 by two tokens: positions count valid tokens only, so its logits must not change.
    ids = ids.at[0].set(jnp.concatenate([jnp.zeros(2, ids.dtype), ids[0, :-2]]))
    mask = jnp.ones_like(ids).at[0, :2].set(0)
    full = model.apply({"params": params}, ids, mask, pixels, qids, qmask)

    @jax.jit
    def step(p, ids, mask, pixels, qids, qmask, cache, index, feats):
        embeds = decoder.apply({"params": p}, ids, feats, method=ZiyaVisual.embed_inputs)
        positions = jax.lax.dynamic_slice_in_dim(default_positions(mask), index, ids.shape[1], axis=1)
        return decoder.apply({"params": p}, embeds, positions, mask, cache, index, method=ZiyaVisual.language)

    feats = decoder.apply({"params": decoder_params}, pixels, qids, qmask, method=ZiyaVisual.encode_images)
    stacked_feats = model.apply({"params": params}, pixels, qids, qmask, method=ZiyaVisual.encode_images)
    np.testing.assert_allclose(np.asarray(feats), np.asarray(stacked_feats), atol=1e-5)
    total = ids.shape[1]
    prompt = total - 3
    cache = init_cache(cfg.llm, ids.shape[0], total, unrolled=unrolled)
    out, cache = step(decoder_params, ids[:, :prompt], mask, pixels, qids, qmask, cache, 0, feats)
    pieces = [out]
    for t in range(prompt, total):
        out, cache = step(decoder_params, ids[:, t : t + 1], mask, pixels, qids, qmask, cache, t, feats)
        pieces.append(out)
    cached = jnp.concatenate(pieces, axis=1)
    np.testing.assert_allclose(np.asarray(cached)[:, 2:], np.asarray(full)[:, 2:], atol=1e-5)

    # Row 0 left-padded gives the same logits as the same tokens unpadded.
    alone = model.apply({"params": params}, ids[:1, 2:], mask[:1, 2:], pixels[:1], qids[:1], qmask[:1])
    np.testing.assert_allclose(np.asarray(full)[0, 2:], np.asarray(alone)[0], atol=1e-5)


def test_lora_targets_zero_init_and_merge():
    cfg = tiny()
    plain_cfg = tiny("variant=chat,stage=2")
    params = init_params(cfg, jax.random.key(0))
    adapters = lora_adapters(params)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert paths == {
        f"['{top}']['layers']['self_attn']['{m}']['{ab}']"
        for top, mods in (("vision_model", ("qkv", "projection")), ("language_model", ("q_proj", "v_proj")))
        for m in mods
        for ab in ("lora_a", "lora_b")
    }
    assert not np.any(np.asarray(params["language_model"]["layers"]["self_attn"]["q_proj"]["lora_b"]))

    args = inputs(cfg)
    base = merge_lora(params, cfg.lora)  # B = 0: merging changes nothing, and drops the adapters
    np.testing.assert_allclose(logits(cfg, params, args), logits(plain_cfg, base, args), atol=1e-6)

    params = perturbed_params(cfg)
    merged = merge_lora(params, cfg.lora)
    np.testing.assert_allclose(logits(plain_cfg, merged, args), logits(cfg, params, args), atol=1e-4)
    restored = unmerge_lora(merged, lora_adapters(params), cfg.lora)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("change", [dict(remat_policy="full"), dict(scan_unroll=8)], ids=["remat", "unrolled"])
def test_remat_or_unrolled_scans_give_same_loss_and_grads(change):
    cfg = tiny()
    params = perturbed_params(cfg)
    args = inputs(cfg)

    def loss(c):
        return lambda p: ZiyaVisual(c).apply({"params": p}, *args).std()

    ref_step, step = (
        jax.jit(jax.value_and_grad(loss(c))).lower(params).compile() for c in (cfg, dataclasses.replace(cfg, **change))
    )
    loops = lambda compiled: compiled.as_text().count(" while(")
    assert loops(ref_step) > 0
    if "scan_unroll" in change:
        assert loops(step) == 0  # the layer stacks became straight-line code
    ref_loss, ref_grad = ref_step(params)
    got_loss, got_grad = step(params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got_grad), jax.tree_util.tree_leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_qformer_attention_modes():
    cfg = tiny("stage=1")
    qf = QFormer(cfg.qformer)
    queries = jax.random.normal(jax.random.key(0), (1, 4, 32))
    image = jax.random.normal(jax.random.key(1), (1, 5, 32))
    text = jnp.array([[5, 6, 7, 8, 9]])
    variables = qf.init(jax.random.key(2), queries, text, None, image)
    run = lambda t, mode: np.asarray(qf.apply(variables, queries, t, None, image, mode))
    changed = text.at[0, 3].set(42)
    for mode in ("bidirectional", "causal_text"):
        diff = np.abs(run(changed, mode) - run(text, mode)).max(-1)[0]
        if mode == "bidirectional":  # everything sees the changed token
            assert (diff > 1e-6).all()
        else:  # queries and earlier text do not; the token itself and later text do
            assert (diff[: 4 + 3] == 0).all() and (diff[4 + 3 :] > 1e-6).all()
    # Text alone (ITC's text side) needs neither queries nor an image.
    assert qf.apply(variables, None, text, None, None).shape == (1, 5, 32)
    with pytest.raises(ValueError, match="attention mode"):
        run(text, "sideways")


def test_vit_interpolates_positions_for_other_sizes():
    cfg = tiny()
    vit = VisionTransformer(cfg.vision)
    variables = vit.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
    assert vit.apply(variables, jnp.zeros((2, 42, 42, 3))).shape == (2, 1 + 9, 32)


def test_lora_target_that_matches_nothing_is_an_error():
    cfg = tiny()
    bad = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, targets=cfg.lora.targets + ("llm/typo",)))
    with pytest.raises(ValueError, match="match no Dense layer"):
        abstract_params(bad)


def test_initializer_ranges_set_each_towers_init_std():
    base = tiny()
    cfg = dataclasses.replace(
        base,
        vision=dataclasses.replace(base.vision, position_initializer_range=1.0),
        qformer=dataclasses.replace(base.qformer, initializer_range=0.1),
        llm=dataclasses.replace(base.llm, initializer_range=0.05),
    )
    before, after = init_params(base, jax.random.key(0)), init_params(cfg, jax.random.key(0))
    pos = ("vision_model", "embeddings", "position_embedding")
    get = lambda p, path: p[path[0]] if len(path) == 1 else get(p[path[0]], path[1:])
    for path, std in (
        (pos, 1.0),
        (("vision_model", "embeddings", "patch_embedding", "kernel"), 0.02),
        (("query_tokens",), 0.1),
        (("language_projection", "kernel"), 0.05),
        (("language_model", "embed_tokens", "embedding"), 0.05),
    ):
        np.testing.assert_allclose(get(after, path), get(before, path) * std / 0.02, rtol=1e-6, err_msg=str(path))
    lora_a = ("language_model", "layers", "self_attn", "q_proj", "lora_a")  # normal(1/r), not a tower weight
    np.testing.assert_array_equal(get(after, lora_a), get(before, lora_a))
