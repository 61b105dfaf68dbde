"""The train state and the pure train step. A stage is data: which parameters train (regexes), which losses
with which weights, and the optimizer; nothing here branches on the stage number."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ziya_jax.config import ModelConfig
from ziya_jax.train.losses import instruction_losses, stage1_losses
from ziya_jax.train.optimizer import split, trainable_mask
from ziya_jax.tree import flatten, unflatten

STAGE1_LOSSES = ("itc", "itm", "itg")
LM_LOSSES = ("lm",)
FROZEN_DTYPES = ("", "float32", "bfloat16")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # nested dict of the trainable parameters only
    frozen: Any  # nested dict of everything else (never updated, no optimizer state)
    opt_state: Any
    rng: jax.Array

    def params(self):
        return merge(self.trainable, self.frozen)


def merge(trainable, frozen):
    return unflatten({**flatten(frozen), **flatten(trainable)})


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one training stage does, read from config.train."""

    trainable: tuple[str, ...]
    loss_weights: tuple[tuple[str, float], ...]
    dec_token_id: int = -1  # the Q-Former tokenizer's [DEC]; needed when ITG is among the losses
    # "" keeps the frozen parameters as loaded; "bfloat16" stores them in half the memory (they are only read,
    # and a bfloat16 compute dtype rounds them to that on every use anyway).
    frozen_dtype: str = ""

    def __post_init__(self):
        if any(k == "itg" for k, _ in self.loss_weights) and self.dec_token_id < 0:
            raise ValueError("ITG needs train.dec_token_id: the Q-Former tokenizer's [DEC] id")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"train.frozen_dtype={self.frozen_dtype!r}; choose one of {FROZEN_DTYPES}")

    @classmethod
    def from_config(cls, train: ml_collections.ConfigDict) -> "Stage":
        weights = tuple(sorted(dict(train.losses).items()))
        names = {k for k, _ in weights}
        if not names or not (names <= set(STAGE1_LOSSES) or names <= set(LM_LOSSES)):
            raise ValueError(f"train.losses={dict(train.losses)}: use {STAGE1_LOSSES} (stage 1) or {LM_LOSSES}")
        if not train.trainable:
            raise ValueError("train.trainable is empty: nothing would train")
        return cls(tuple(train.trainable), weights, train.get("dec_token_id", -1), train.get("frozen_dtype", ""))


def init_state(params, stage: Stage, tx: optax.GradientTransformation, rng) -> TrainState:
    mask = trainable_mask(params, stage.trainable)
    trainable, frozen = (unflatten(d) for d in split(params, mask))
    if not trainable:
        raise ValueError(f"train.trainable={stage.trainable} matches no parameter")
    if stage.frozen_dtype:
        frozen = jax.tree.map(lambda p: p.astype(stage.frozen_dtype), frozen)
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable), rng=rng
    )


def stage_losses(params, cfg: ModelConfig, stage: Stage, batch, rng, deterministic=False) -> dict:
    names = {k for k, _ in stage.loss_weights}
    if names <= set(STAGE1_LOSSES):
        return stage1_losses(params, cfg, batch, rng, stage.dec_token_id, tuple(sorted(names)), deterministic)
    return instruction_losses(params, cfg, batch, rng, deterministic)


def train_step(
    state: TrainState,
    batch,
    cfg: ModelConfig,
    stage: Stage,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
):
    """One optimizer step -> (new state, metrics). Jit it with everything but state and batch bound
    (functools.partial), e.g. tx = make_optimizer(opt), lr_schedule = schedule(opt)."""
    rng, step_rng = jax.random.split(state.rng)

    def loss_fn(trainable):
        losses = stage_losses(merge(trainable, state.frozen), cfg, stage, batch, step_rng)
        return sum(w * losses[k] for k, w in stage.loss_weights), losses

    (total, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    if "temp" in trainable:  # BLIP-2 keeps the ITC temperature in [0.001, 0.5] by clamping the parameter
        trainable = {**trainable, "temp": jnp.clip(trainable["temp"], 0.001, 0.5)}
    metrics = {"loss": total, **losses, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step)}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng), metrics
