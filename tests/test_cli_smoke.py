"""The commands no other test runs, run once as a user runs them: each exits 0 and prints what it says it does."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_summary_counts_the_full_size_model():
    out = run("ziya_jax.summary", "--config", "configs/ziya_base_14b.py:stage=2")
    assert "13,091,886,080" in out  # the LLM, as the reference counts it


def test_data_builds_tokenizers_a_synthetic_set_and_a_manifest_set(tmp_path):
    out = run("ziya_jax.data", "tokenizers", "--out", str(tmp_path / "tok"))
    assert sorted(os.listdir(tmp_path / "tok")) == ["llm.model", "qformer.model"] and "llm.model" in out
    out = run(
        "ziya_jax.data", "synthetic", "--data-dir", str(tmp_path / "tfds"), "--image-size", "16",
        "--train", "6", "--validation", "2", "--test", "2",
    )  # fmt: skip
    assert "train 6" in out and "validation 2" in out and "test 2" in out
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "red.png")
    entries = [{"id": str(i), "image": "red.png", "caption": f"a red square {i}"} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    out = run(
        "ziya_jax.data", "manifest", "--data-dir", str(tmp_path / "tfds"), "--name", "mine",
        "--split", f"train={tmp_path / 'train.jsonl'}",
    )  # fmt: skip
    assert "llava_manifest/mine" in out and "train 3" in out


def test_bench_decode_small_prints_its_ratios_and_where_a_step_goes(tmp_path):
    out = run("ziya_jax.bench", "decode", "--small", "--new-tokens", "4", "--repeats", "2", "--profile", str(tmp_path))
    result = json.loads(out.strip().splitlines()[-1])
    assert [r["row"] for r in result["rows"]] == ["greedy b1", "greedy b8", "beam4 b1"]
    assert all(r["ratio_min"] <= r["ratio"] <= r["ratio_max"] for r in result["rows"])
    for row in result["profile"].values():  # the loop's ops were found in the compiled program and sorted
        assert row["ms"]["weight products"] > 0 and sum(row["ms"].values()) >= row["step_ms"] * 0.99
