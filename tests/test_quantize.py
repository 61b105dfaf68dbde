"""int8 weight-only quantisation (ziya_jax.quantize) on the tiny Chat stage-3 model (LoRA on the ViT and the LLM):
the stored weights, the product, logits and greedy decoding against float32, the summary's weight bytes and the
decode step compiled for a TPU topology."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ziya_jax.config import ModelConfig, load_config
from ziya_jax.decode import DecodeConfig, decode_params, generate
from ziya_jax.model import ZiyaVisual, init_params, layers
from ziya_jax.model.layers import merge_lora
from ziya_jax.model.ziya import dummy_inputs
from ziya_jax.quantize import QUANTIZED_PARTS, quantize, shardings
from ziya_jax.sharding import make_mesh, param_shardings, rules_from_config
from ziya_jax.tree import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny.py:variant=chat,stage=3"


@pytest.fixture(scope="module")
def model():
    """The tiny model with trained-looking LoRA (B non-zero) and an LM head large enough that greedy answers depend
    on the input; its int8 quantisation."""
    cfg = ModelConfig.from_dict(load_config(CONFIG).model.to_dict())
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, params
    )
    params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 50
    qparams, qcfg = quantize(params, cfg, "int8")
    return params, cfg, qparams, qcfg


def inputs(cfg, batch=2):
    ids, pixels, qids = dummy_inputs(cfg, batch=batch, text_len=6)
    ids = ids.at[:, cfg.num_query_tokens :].set(jnp.arange(3, 9))
    return ids, jax.random.normal(jax.random.key(1), pixels.shape), qids


def test_linear_layers_of_vit_and_llm_are_int8_per_output_channel(model):
    params, cfg, qparams, qcfg = model
    merged, flat = flatten(merge_lora(params, cfg.lora)), flatten(qparams)
    assert qcfg.lora.rank == 0 and not any(p[-1].startswith("lora_") for p in flat)
    kernels = [p for p in merged if p[-1] == "kernel"]
    assert {p[0] for p in kernels} >= set(QUANTIZED_PARTS) | {"qformer"}
    for path in kernels:
        w, q = np.asarray(merged[path]), np.asarray(flat[path])
        if path[0] not in QUANTIZED_PARTS:  # the Q-Former and the projection keep their float kernels
            assert q.dtype == w.dtype and np.array_equal(q, w) and path[:-1] + ("kernel_scale",) not in flat
            continue
        scale = np.asarray(flat[path[:-1] + ("kernel_scale",)])
        assert q.dtype == np.int8 and scale.dtype == np.float32
        assert scale.shape == w.shape[:-2] + (1, w.shape[-1])  # one scale per output channel (of each layer)
        assert np.abs(q * scale - w).max() <= 0.5 * scale.max() * 1.0001  # round to nearest
        assert np.abs(q.astype(np.int32)).max(axis=-2).min() >= 127  # each channel's largest weight uses the full range
    others = [p for p in merged if p[-1] != "kernel"]
    assert all(np.array_equal(flat[p], merged[p]) for p in others)
    assert quantize(params, cfg, "") == (params, cfg) and quantize(params, cfg, "none") == (params, cfg)
    with pytest.raises(ValueError, match="quantize mode"):
        quantize(params, cfg, "int4")


@pytest.mark.parametrize("shape", [(1, 96), (3, 5, 588)])  # 588 = 14 x 14 x 3 (the ViT's patch embedding)
def test_int8_product_equals_the_dequantised_float_product(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    kernel = jnp.asarray(rng.integers(-128, 128, (shape[-1], 40)).astype(np.int8))
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (1, 40)).astype(np.float32))
    want = x @ (kernel.astype(jnp.float32) * scale)
    got = jax.jit(layers.int8_matmul)(x, kernel, scale)
    assert got.dtype == jnp.float32 and got.shape == (*shape[:-1], 40)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_logits_close_to_float32(model):
    """Measured on this model: 0.76% relative error (norm of the difference / norm of the logits)."""
    params, cfg, qparams, qcfg = model
    ids, pixels, qids = inputs(cfg)
    forward = lambda p, c: ZiyaVisual(c).apply({"params": p}, ids, jnp.ones_like(ids), pixels, qids)
    want, got = forward(params, cfg), forward(qparams, qcfg)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.015


def test_greedy_decoding_on_int8_weights(model):
    """Stacked or per-layer weights, quantised before or after decode_params: the same tokens, and here those of
    float32."""
    params, cfg, qparams, qcfg = model
    ids, pixels, qids = inputs(cfg)
    run = lambda p, c: generate(
        p, c, ids, pixel_values=pixels, qformer_ids=qids, dc=DecodeConfig(max_new_tokens=6, eos_token_id=-1)
    )[0]
    want = run(params, cfg)
    assert len({tuple(want[0]), tuple(want[1])}) == 1 and len(set(want[0])) > 1  # non-trivial answers
    for p in (qparams, decode_params(qparams), quantize(decode_params(params), cfg, "int8")[0]):
        np.testing.assert_array_equal(run(p, qcfg), want)


def test_scale_shardings_follow_their_kernels(model):
    _, cfg, qparams, _ = model
    mesh = make_mesh((1, -1, 1))  # fsdp over the 8 host devices
    float_shardings = param_shardings(cfg, mesh, rules_from_config(load_config(CONFIG)))
    quantized = shardings(float_shardings, qparams)
    assert jax.tree_util.tree_structure(quantized) == jax.tree_util.tree_structure(qparams)
    flat, arrays = flatten(quantized), flatten(qparams)
    scales = [p for p in flat if p[-1] == "kernel_scale"]
    assert scales
    for path in scales:
        kernel = tuple(flat[path[:-1] + ("kernel",)].spec)
        kernel += (None,) * (arrays[path].ndim - len(kernel))
        assert tuple(flat[path].spec) == kernel[:-2] + (None, kernel[-1])


def run_module(*args):
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_summary_prints_int8_weight_bytes_below_bfloat16():
    done = run_module("ziya_jax.summary", "--config", CONFIG, "--quantize", "int8")
    assert done.returncode == 0, done.stderr
    assert "GB (bfloat16)" in done.stdout and "GB (int8)" in done.stdout
    totals = re.search(r"int8 / bfloat16: [\d.]+% \(([\d,]+) / ([\d,]+)\)", done.stdout).groups()
    int8, bf16 = (int(t.replace(",", "")) for t in totals)
    assert int8 < 0.75 * bf16  # this tiny model is mostly the Q-Former and embeddings, which stay bfloat16


def test_compiled_decode_step_reads_int8_weights_on_a_tpu_topology():
    done = run_module(
        "ziya_jax.compile", "--config", CONFIG, "--topology", "v5e-4", "--programs", "decode", "--quantize", "int8"
    )
    assert done.returncode == 0, done.stderr
    results = {r["program"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    assert set(results) == {"decode_step_bf16", "decode_step_int8"}
    assert results["decode_step_int8"]["argument_gib"] < results["decode_step_bf16"]["argument_gib"]
