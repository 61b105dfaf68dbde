"""Meshes and logical-axis sharding. Model code names axes ('embed', 'heads', ...); the rules here (or a
config's `sharding.rules`) map them to mesh axes (data, fsdp, tensor). Nothing is materialised unsharded:
shapes come from jax.eval_shape and parameters are created by a jit whose out_shardings are the targets."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ziya_jax.config import ModelConfig
from ziya_jax.model.ziya import abstract_params, init_fn

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters: 'embed' is split over fsdp (ZeRO-3 style), head/MLP/vocab dims over tensor. Activations
# ('act_*'): batch over data and fsdp, the model dim replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("qformer_embed", None),
    ("qformer_vocab", None),  # 30523 entries: not divisible by a tensor axis
    ("embed_out", None),
    ("patch", None),
    ("norm", None),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 and is filled from the device count."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape needs 3 entries for {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_specs(cfg: ModelConfig):
    """PartitionSpecs of logical axis names for every parameter (from eval_shape; allocates nothing)."""
    return nn.get_partition_spec(abstract_params(cfg))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings of every parameter on `mesh` under `rules`."""
    return nn.logical_to_mesh_sharding(logical_specs(cfg), mesh, list(rules))


def init_sharded(cfg: ModelConfig, rng, mesh: Mesh, rules=DEFAULT_RULES):
    """Initialise parameters directly into their shardings: each device only ever holds its shards."""
    init = lambda r: nn.meta.unbox(init_fn(cfg)(r))
    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, rules))(rng)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
