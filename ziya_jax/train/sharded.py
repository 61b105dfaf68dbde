"""The train state's shapes and shardings without allocating it, for ahead-of-time compilation, checkpoint
restores into any mesh, and creating the state directly in its shards.

Trainable and frozen parameters are sharded as ziya_jax.sharding.param_shardings places them; every optimizer
leaf that mirrors a parameter (Adam's moments, accumulated gradients) is sharded like that parameter, and the
rest (step counters, the rng) is replicated.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ziya_jax.config import ModelConfig
from ziya_jax.model import abstract_params
from ziya_jax.model.ziya import init_fn
from ziya_jax.sharding import DEFAULT_RULES, batch_sharding, param_shardings
from ziya_jax.train.step import Stage, TrainState, init_state, train_step
from ziya_jax.tree import flatten


def _state_shapes(cfg: ModelConfig, stage: Stage, tx: optax.GradientTransformation) -> TrainState:
    params = nn.meta.unbox(abstract_params(cfg))
    return jax.eval_shape(lambda p, r: init_state(p, stage, tx, r), params, jax.random.key(0))


def state_shardings(
    cfg: ModelConfig, stage: Stage, tx: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES
) -> TrainState:
    """A TrainState of NamedShardings on `mesh` (nothing is allocated)."""
    return _shardings(_state_shapes(cfg, stage, tx), param_shardings(cfg, mesh, rules), mesh)


def _shardings(shapes: TrainState, params: dict, mesh: Mesh) -> TrainState:
    param_leaves = {**flatten(shapes.frozen), **flatten(shapes.trainable)}
    by_path = {path: (param_leaves[path].shape, sharding) for path, sharding in flatten(params).items()}
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_param(key_path, leaf):
        # An optimizer leaf mirrors a parameter when the dict keys on its path and its shape are the parameter's.
        path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        shape, sharding = by_path.get(path, (None, replicated))
        return sharding if shape == leaf.shape else replicated

    place = lambda tree: jax.tree_util.tree_map_with_path(like_param, tree)
    return TrainState(
        step=replicated,
        trainable=place(shapes.trainable),
        frozen=place(shapes.frozen),
        opt_state=place(shapes.opt_state),
        rng=replicated,
    )


def abstract_train_state(
    cfg: ModelConfig, stage: Stage, tx: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES
) -> TrainState:
    """A TrainState of jax.ShapeDtypeStructs carrying their shardings: the input of `jit(...).lower` for
    ahead-of-time compilation and the target of an Orbax restore (into this mesh, whatever mesh saved it)."""
    shapes = _state_shapes(cfg, stage, tx)
    shardings = _shardings(shapes, param_shardings(cfg, mesh, rules), mesh)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def create_train_state(
    cfg: ModelConfig, stage: Stage, tx: optax.GradientTransformation, rng, mesh: Mesh, rules=DEFAULT_RULES
) -> TrainState:
    """A fresh TrainState created by one jit whose outputs are the target shardings: no device ever holds more
    than its shards. `rng` seeds the parameters; the state's own rng is derived from it."""
    init_rng, state_rng = jax.random.split(rng)

    def init(r_params, r_state):
        params = nn.meta.unbox(init_fn(cfg)(r_params))
        return init_state(params, stage, tx, r_state)

    shardings = state_shardings(cfg, stage, tx, mesh, rules)
    return jax.jit(init, out_shardings=shardings)(init_rng, state_rng)


def jit_train_step(
    cfg: ModelConfig,
    stage: Stage,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    mesh: Mesh,
    rules=DEFAULT_RULES,
):
    """train_step jitted as a loop should run it: the state donated and returned in the shardings it came in
    (left to propagation, some leaves come back placed differently and the second step compiles again, or
    fails against an executable compiled ahead of time), metrics replicated."""
    step = functools.partial(train_step, cfg=cfg, stage=stage, tx=tx, lr_schedule=lr_schedule)
    out = (state_shardings(cfg, stage, tx, mesh, rules), NamedSharding(mesh, PartitionSpec()))
    return jax.jit(step, donate_argnums=0, out_shardings=out)


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """{name: ShapeDtypeStruct} of a global batch, sharded over the batch axis as the train loop feeds it."""
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), rules))
        for k, (shape, dtype) in shapes.items()
    }


def qformer_text_len(data, cfg: ModelConfig, stage1: bool) -> int:
    """Q-Former tokens a row holds: stage 1's captions (data.qformer_text_len), or a Chat model's instruction
    (model.instruction_len, which inference reads from the saved model too); Base instruction rows hold none."""
    if stage1:
        return data.get("qformer_text_len", 0)
    if "qformer_text_len" in data:
        raise ValueError(
            "data.qformer_text_len is stage 1's caption length; instruction stages take a Chat model's "
            "instruction length from model.instruction_len"
        )
    return cfg.instruction_len if cfg.variant == "chat" else 0


def batch_shapes(data, cfg: ModelConfig, stage1: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The global batch the data pipeline yields for a config's `data` section (see ziya_jax.data.pipeline):
    image-caption pairs for stage 1, instruction rows otherwise."""
    b, size = data.batch_size, cfg.vision.image_size
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    qlen = qformer_text_len(data, cfg, stage1)
    if stage1:
        return {
            "pixel_values": ((b, size, size, 3), f32),
            "text_ids": ((b, qlen), i32),
            "text_mask": ((b, qlen), i32),
            "itg_ids": ((b, qlen), i32),
        }
    n, t = data.get("max_images", 1), data.text_len
    out = {
        "input_ids": ((b, t), i32),
        "attention_mask": ((b, t), i32),
        "loss_mask": ((b, t), i32),
        "pixel_values": ((b, n, size, size, 3), f32),
        "image_mask": ((b, n), i32),
    }
    packed = data.get("pack", False)
    if packed:
        out.update(segment_ids=((b, t), i32), positions=((b, t), i32))
    if qlen:
        q_shape = (b, n, qlen) if packed else (b, qlen)
        out.update(qformer_ids=(q_shape, i32), qformer_mask=(q_shape, i32))
    return out
