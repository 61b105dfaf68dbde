"""Loading a model for inference as a user asks for it: sharded over 8 forced CPU devices (--mesh), and in bf16
(--dtype) without a float32 copy of the model on the host."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ziya_jax.checkpoint import save_model
from ziya_jax.config import ModelConfig, load_config
from ziya_jax.model import init_params

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT_DEVICES = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = ModelConfig.from_dict(load_config("configs/tiny.py:variant=chat,stage=3").model.to_dict())
    params = init_params(cfg, jax.random.key(0))
    params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 50
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_model(str(path), params, cfg)
    return path, cfg


@pytest.mark.parametrize("mesh", ["1,4,2", "1,-1,1"])
def test_generate_on_a_mesh_gives_the_one_device_tokens(tiny_checkpoint, tmp_path, mesh):
    path, cfg = tiny_checkpoint
    np.save(tmp_path / "px.npy", np.random.default_rng(0).normal(size=(28, 28, 3)).astype(np.float32))
    args = [
        "--checkpoint",
        str(path),
        "--image",
        str(tmp_path / "px.npy"),
        "--input-ids",
        "5,6,7",
        "--qformer-input-ids",
        "1,4,9,2",
        "--max-new-tokens",
        "8",
        "--json",
    ]

    def tokens(*extra):
        done = subprocess.run(
            [sys.executable, "-m", "ziya_jax.generate", *args, *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env=EIGHT_DEVICES,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["token_ids"]

    one = tokens()
    assert len(set(one)) > 2  # the answer depends on the weights, so a broken shard would show
    assert tokens("--mesh", mesh) == one


def test_a_bad_mesh_is_one_line(tiny_checkpoint):
    path, _ = tiny_checkpoint
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ziya_jax.generate",
            "--checkpoint",
            str(path),
            "--input-ids",
            "5",
            "--qformer-input-ids",
            "1",
            "--mesh",
            "3,-1,1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=EIGHT_DEVICES,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


MEASURE = """
import json, resource, sys
import jax
from ziya_jax.checkpoint import load_model, load_model_config

def peak():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's across exec)
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

def current():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

load_model_config(sys.argv[1])
before = peak()
params, _ = load_model(sys.argv[1], dtype="bfloat16")
leaves = jax.tree_util.tree_leaves(params)
dtypes = sorted({str(x.dtype) for x in leaves})
print(json.dumps({"before": before, "peak": peak(), "after": current(), "dtypes": dtypes,
                  "bf16_bytes": sum(x.nbytes for x in leaves), "f32_bytes": sum(x.size * 4 for x in leaves),
                  "largest_f32": max(x.size * 4 for x in leaves)}))
"""


def test_bfloat16_loading_holds_one_float32_tensor_at_a_time(tmp_path):
    """A model of ~450 MiB in float32 (more than the rest of the process) in many ~64 MiB tensors: loaded as bf16,
    the peak above what stays loaded is at most two float32 tensors, never the model's float32 copy."""
    cfg = ModelConfig.from_dict(
        dict(
            variant="base",
            vision=dict(image_size=28, patch_size=14, width=32, depth=1, num_heads=2, mlp_dim=64),
            qformer=dict(width=32, depth=2, num_heads=2, mlp_dim=64, cross_attention_frequency=1),
            llm=dict(vocab_size=4000, width=1024, depth=16, num_heads=8, num_kv_heads=8, head_dim=128, mlp_dim=1024),
            num_query_tokens=4,
            image_token_id=3999,
        )
    )
    save_model(str(tmp_path / "big"), init_params(cfg, jax.random.key(0)), cfg)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "big")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    mib = {k: round(v / 2**20) for k, v in m.items() if isinstance(v, int)}
    print("peak RSS while loading in bf16 (MiB):", mib)
    assert m["dtypes"] == ["bfloat16"]
    assert m["f32_bytes"] > m["before"]  # the model is larger than the rest of the process
    assert m["peak"] - m["before"] < m["f32_bytes"]
    assert m["peak"] - m["after"] <= 2 * m["largest_f32"]
