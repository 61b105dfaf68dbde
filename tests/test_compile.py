"""Ahead-of-time compilation: topology names, the FLOP count behind the roofline, depth-independent compile time of
the scanned LLaMA, and `python -m ziya_jax.compile` for a real TPU topology on this CPU host (libtpu)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ziya_jax.compile import llama_step, parse_topology
from ziya_jax.config import ModelConfig, load_config
from ziya_jax.sharding import DEFAULT_RULES, make_mesh
from ziya_jax.train.observe import matmul_flops

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name,libtpu,chips",
    [
        ("v5e-64", "v5e:8x8", 64),
        ("v5e-8", "v5e:2x4", 8),
        ("v6e-16", "v6e:4x4", 16),
        ("v5e:4x8", "v5e:4x8", 32),
        ("v4-8", "v4:2x2x1", 4),
        ("v4-32", "v4:2x2x4", 16),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v4-1024", "v4:8x8x8", 512),
    ],
)
def test_topology_names(name, libtpu, chips):
    topo = parse_topology(name)
    assert (topo.libtpu_topology, topo.chips_per_slice) == (libtpu, chips)


@pytest.mark.parametrize("bad", ["v5e-6", "v4-6", "v7-8", "v5e:4x4x4", "tpu"])
def test_bad_topology_names_are_refused(bad):
    with pytest.raises(ValueError):
        parse_topology(bad)


def test_matmul_flops_counts_every_scan_iteration_the_larger_branch_and_remat():
    n = 16
    w = jnp.ones((n, n))

    def scanned(x, layers):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=layers)[0].sum()

    one = 2 * n**3
    assert matmul_flops(jax.make_jaxpr(lambda x: scanned(x, 4))(w).jaxpr) == 4 * one
    assert matmul_flops(jax.make_jaxpr(lambda x: scanned(x, 40))(w).jaxpr) == 40 * one
    branches = lambda p, x: jax.lax.cond(p, lambda: x @ x @ x, lambda: x)
    assert matmul_flops(jax.make_jaxpr(branches)(True, w).jaxpr) == 2 * one
    # d/dx of sum(tanh(x @ w) @ w): two products forward, two backward; remat recomputes x @ w for tanh'.
    chain = lambda x: (jnp.tanh(x @ w) @ w).sum()
    assert matmul_flops(jax.make_jaxpr(jax.grad(chain))(w).jaxpr) == 4 * one
    assert matmul_flops(jax.make_jaxpr(jax.grad(jax.checkpoint(chain)))(w).jaxpr) == 5 * one


def test_scanned_llama_program_does_not_grow_with_depth():
    """4 vs 40 layers: the same program before and after XLA's optimisation (the layer loop is not unrolled), so
    compile time does not grow with depth. (Compile times themselves vary too much on a shared CPU to assert.)"""
    model = load_config("configs/tiny.py:variant=base,stage=2").model.to_dict()
    model["remat_policy"] = "full"
    model["llm"] = dict(model["llm"], width=128, num_heads=8, num_kv_heads=8, head_dim=16, mlp_dim=256)
    cfg = ModelConfig.from_dict(model)
    mesh = make_mesh((2, 2, 2))
    sizes = {}
    for depth in (4, 40):
        step, args = llama_step(cfg, depth, 8, 32, mesh, DEFAULT_RULES)
        with jax.set_mesh(mesh):
            lowered = step.lower(*args)
            compiled = lowered.compile()
        sizes[depth] = (len(lowered.as_text().splitlines()), len(compiled.as_text().splitlines()))
    assert sizes[4] == sizes[40], sizes


TINY_TRAIN = """
from ziya_jax.config import load_config
from ziya_jax.train.optimizer import default_optimizer

def get_config(arg=None):
    config = load_config("configs/tiny.py:variant=chat,stage=3")
    config.data = dict(batch_size=8, text_len=16, max_images=1)
    config.train = dict(trainable=("qformer", "query_tokens", "language_projection", r".*/lora_[ab]"),
                        losses=dict(lm=1.0), optimizer=default_optimizer())
    return config
"""


def compile_cli(*args):
    done = subprocess.run(
        [sys.executable, "-m", "ziya_jax.compile", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    lines = done.stdout.strip().splitlines()
    return done.returncode, (json.loads(lines[-1]) if lines and lines[-1].startswith("[") else None), done


def test_compile_cli_train_and_decode_step_for_a_tpu_topology(tmp_path):
    config = tmp_path / "tiny_train.py"
    config.write_text(TINY_TRAIN)
    rc, results, done = compile_cli("--config", str(config), "--topology", "v5e-4")
    assert rc == 0, done.stderr
    train, decode = results
    assert (train["program"], decode["program"]) == ("train_step", "decode_step")
    for r in results:
        assert r["fits"] and r["chips"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
        assert 0 < r["argument_gib"] <= r["total_gib"] < r["hbm_gib"] == 16.0
        assert r["flops_per_chip"] > 0 and r["roofline_s"] > 0
    assert train["batch"] == 8 and decode["batch"] == 4  # one decode row per batch shard
    assert train["alias_gib"] > 0  # the state is donated: the new state reuses its buffers
    assert "| train_step | v5e-4 | 4 | 4x1x1 | 8 |" in done.stdout


def test_compile_cli_reports_what_does_not_fit_and_finds_the_smallest_topology(tmp_path):
    config = tmp_path / "tiny_train.py"
    config.write_text(TINY_TRAIN)
    # Four rows against a 16M-slot KV cache: about 40 GiB on one v5e chip (cache, attention temporaries), a
    # quarter of that per chip on four.
    big = ["--config", str(config), "--programs", "decode", "--decode-batch", "4", "--decode-len", "16000000"]
    rc, results, done = compile_cli(*big, "--topology", "v5e-1")
    assert rc == 1 and not results[0]["fits"]
    assert "does not fit: decode_step on v5e-1" in done.stderr and "Traceback" not in done.stderr
    rc, results, done = compile_cli(*big, "--topology", "v5e-1,v5e-4,v5e-16", "--smallest")
    assert rc == 0, done.stderr
    assert [(r["topology"], r["fits"]) for r in results] == [("v5e-1", False), ("v5e-4", True)]


def test_compile_cli_errors_are_one_line():
    rc, _, done = compile_cli("--config", "configs/tiny.py", "--topology", "v5e-4")
    assert rc == 2 and "no `train` section" in done.stderr and "Traceback" not in done.stderr
    rc, _, done = compile_cli("--config", "configs/tiny.py", "--topology", "v9-8")
    assert rc == 2 and "unknown topology" in done.stderr
