"""The demo's vision pretraining (stage 0): its loss against numpy, its accuracy on known logits, deterministic
batches, and the demo ViT learning to read the grid cells."""

import os

import numpy as np
import pytest

from ziya_jax.config import load_config
from ziya_jax.data import synthetic
from ziya_jax.train import loop
from ziya_jax.train.vision import cell_accuracy, cell_batches, cell_loss

pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
CLASSES = [len(names) + 1 for names in synthetic.CELL_ATTRIBUTES.values()]


def random_logits(rng, batch=3):
    heads = dict(zip(synthetic.CELL_ATTRIBUTES, CLASSES)) | {"cell": 9}
    return {a: rng.normal(size=(batch, 9, n)).astype(np.float32) for a, n in heads.items()}


def numpy_cross_entropy(logits, labels):
    x = logits - logits.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1).mean()


def random_labels(rng, batch=3):
    return np.stack([rng.integers(0, n, (batch, 9)) for n in CLASSES], -1)


def test_cell_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits, labels = random_logits(rng), random_labels(rng)
    expected = numpy_cross_entropy(logits["cell"], np.broadcast_to(np.arange(9), (3, 9)))  # each token's own cell
    for k, a in enumerate(synthetic.CELL_ATTRIBUTES):
        expected += numpy_cross_entropy(logits[a], labels[..., k])
    np.testing.assert_allclose(float(cell_loss(logits, labels)), expected, rtol=1e-5)


def test_cell_accuracy_scores_occupied_cells_only():
    labels = np.array([[[0, 1, 2], [6, 5, 3], [2, 0, 1]]])  # cells: occupied, empty, occupied
    logits = {a: np.eye(n)[labels[..., k]] for k, (a, n) in enumerate(zip(synthetic.CELL_ATTRIBUTES, CLASSES))}
    logits["shape"][0, 0] = np.eye(CLASSES[1])[4]  # wrong shape in one of the two occupied cells
    logits["size"][0, 1] = np.eye(CLASSES[2])[0]  # wrong size in the empty cell: not scored
    scores = {k: float(v) for k, v in cell_accuracy(logits, labels).items()}
    assert scores == {"color_acc": 1.0, "shape_acc": 0.5, "size_acc": 1.0}


def test_batches_are_deterministic_and_labelled():
    a, b = cell_batches("train", 50, 24, 4, seed=1), cell_batches("train", 50, 24, 4, seed=1)
    np.testing.assert_array_equal(a[3]["pixel_values"], b[3]["pixel_values"])
    assert a[3]["pixel_values"].shape == (4, 24, 24, 3) and a[3]["labels"].shape == (4, 9, 3)
    assert not np.array_equal(a[0]["labels"], cell_batches("train", 50, 24, 4, seed=2)[0]["labels"])


def test_the_demo_vit_learns_to_read_the_cells(tmp_path, capsys):
    config = load_config(f"{DEMO}:stage=0")
    config.data.update(n=3200, eval_n=200)  # the demo's ViT, a quarter of its steps
    config.train.optimizer.update(total_steps=100, warmup_steps=10)
    loop.run(config, str(tmp_path))
    line = [s for s in capsys.readouterr().out.splitlines() if "validation cells read correctly" in s][0]
    scores = {k: float(v) for k, v in (item.split() for item in line.split(": ")[-1].split(", "))}
    assert scores["color_acc"] > 0.9 and scores["shape_acc"] > 0.3 and scores["size_acc"] > 0.5, scores  # chance:
    # 1/6, 1/5, 1/3
    assert (tmp_path / "model").is_dir()


def test_the_grid_must_match_the_patches(tmp_path):
    config = load_config(f"{DEMO}:stage=0")
    config.model.vision.update(image_size=32, patch_size=8)
    with pytest.raises(ValueError, match="image_size / patch_size must be 3"):
        loop.run(config, str(tmp_path))
