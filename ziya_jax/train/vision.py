"""Vision pretraining for the demo: its stand-in for the pretrained EVA-CLIP tower that Ziya-Visual starts from.

The paper's stages 1 and 2 keep a pretrained ViT frozen. The demo has no pretrained weights (nothing is
downloaded), and a tiny ViT trained from scratch by stage 1's caption objectives (ITC/ITM/ITG) learns colours but
not shapes or sizes: linear probes on its tokens read the shape of a grid cell at 0.34 (chance 0.2; 0.42 before
training), the size at 0.53 (chance 0.33). So the demo first trains its ViT on what a pretrained tower
already sees: one linear head per attribute reads each patch token's grid cell (colour, shape, size, or empty)
from the synthetic scenes, and one more head names each token's own cell. Without that last head a token's
position part (the norm of its per-cell mean) is ~1.7 against ~8.8 of content, too weak for the Q-Former's queries
to pick out a cell; with it, 6.6 against 8.2, and the Q-Former's ITG learns which object sits where
(docs/demo.md). The heads are then dropped and the ViT is written into an otherwise freshly initialised model,
which stage 1 starts from. Patch token i must be grid cell i: image_size / patch_size ==
synthetic.GRID.

It takes well under a minute on 2 CPU cores, so it keeps no checkpoints: an interrupted run starts over, and a
finished one (its model/ folder exists) is skipped, as any stage. It runs in one process on the default device.
"""

from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
from PIL import Image

from ziya_jax.config import ModelConfig, VisionConfig
from ziya_jax.data import images, synthetic
from ziya_jax.model.vit import VisionTransformer
from ziya_jax.model.ziya import init_params
from ziya_jax.train.checkpoints import save_final
from ziya_jax.train.observe import Reporter
from ziya_jax.train.optimizer import logged_lr, make_optimizer


class CellHeads(nn.Module):
    """The ViT (parameters named as in the model, vision_model/...) and linear heads on each patch token: one per
    attribute, and one naming the token's own cell -> {attribute: logits [B, cells, classes + 1],
    "cell": logits [B, cells, cells]}."""

    cfg: VisionConfig
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, pixels):
        tokens = VisionTransformer(self.cfg, scan_unroll=self.scan_unroll, name="vision_model")(pixels)[:, 1:]
        heads = {a: nn.Dense(len(names) + 1, name=a)(tokens) for a, names in synthetic.CELL_ATTRIBUTES.items()}
        return heads | {"cell": nn.Dense(tokens.shape[1], name="cell")(tokens)}


def cell_batches(split: str, n: int, image_size: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Batch k (of an endless, seeded shuffle of n scenes): pixel_values [B, S, S, 3], labels [B, cells, 3]."""

    def example(index):
        image, scene = synthetic.generate(split, int(index), image_size)
        return {
            "pixel_values": images.to_pixels(Image.fromarray(image), image_size),
            "labels": synthetic.cell_labels(scene),
        }

    return grain.MapDataset.range(n).shuffle(seed=seed).repeat().map(example).batch(batch_size, drop_remainder=True)


def cell_loss(logits: dict, labels):
    """Sum over attributes of the mean cross-entropy over every cell (empty cells included), plus the mean
    cross-entropy of each token naming its own cell."""
    own_cell = jnp.broadcast_to(jnp.arange(labels.shape[1]), labels.shape[:2])
    return (
        sum(
            optax.softmax_cross_entropy_with_integer_labels(logits[a], labels[..., k]).mean()
            for k, a in enumerate(synthetic.CELL_ATTRIBUTES)
        )
        + optax.softmax_cross_entropy_with_integer_labels(logits["cell"], own_cell).mean()
    )


def cell_accuracy(logits: dict, labels) -> dict:
    """Per attribute, the fraction of occupied cells read correctly."""
    occupied = labels[..., 0] < len(synthetic.CELL_ATTRIBUTES["color"])
    return {
        f"{a}_acc": ((logits[a].argmax(-1) == labels[..., k]) * occupied).sum() / occupied.sum()
        for k, a in enumerate(synthetic.CELL_ATTRIBUTES)
    }


def train_vision(config: ml_collections.ConfigDict, workdir: str, final: str) -> dict:
    """Trains the ViT of config.model on cell labels (metrics in workdir) and writes the model to `final` -> {}
    (no test-split evaluation; the validation accuracies are printed and logged)."""
    if jax.process_count() > 1:
        raise ValueError(
            "vision pretraining (the demo's stage 0) runs in one process; run it alone, then pass its "
            "model to stage 1 as train.init_from"
        )
    cfg = ModelConfig.from_dict(config.model.to_dict())
    size, data, train = cfg.vision.image_size, config.data, config.train
    if size // cfg.vision.patch_size != synthetic.GRID:
        raise ValueError(
            f"vision pretraining reads one grid cell per patch token: image_size / patch_size must be "
            f"{synthetic.GRID}, got {size} / {cfg.vision.patch_size}"
        )
    model = CellHeads(cfg.vision, cfg.scan_unroll)
    full = init_params(cfg, jax.random.key(train.seed))
    params = model.init(jax.random.key(train.seed), jnp.zeros((1, size, size, 3)))["params"]
    params["vision_model"] = full["vision_model"]  # the model's own initialisation (initializer ranges)
    tx, lr_at = make_optimizer(train.optimizer), logged_lr(train.optimizer)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: cell_loss(model.apply({"params": p}, batch["pixel_values"]), batch["labels"])
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = cell_batches(data.split, data.n, size, data.batch_size, data.seed)
    total = train.optimizer.total_steps
    reporter = Reporter(workdir, total, 0, config.log_every, "vision pretraining")
    opt_state = tx.init(params)
    try:
        for k in range(total):
            params, opt_state, loss = step(params, opt_state, batches[k])
            reporter.step(k + 1, {"loss": float(loss), "lr": float(lr_at(k))})
        val = cell_batches("validation", data.eval_n, size, data.eval_n, 0)[0]
        scores = {
            k: float(v)
            for k, v in cell_accuracy(model.apply({"params": params}, val["pixel_values"]), val["labels"]).items()
        }
        reporter.scalars(total, "eval", scores)
    finally:
        reporter.close()
    print(f"{workdir}: validation cells read correctly: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    full["vision_model"] = params["vision_model"]
    save_final(final, full, cfg)
    return {}
