"""Meshes and logical-axis sharding. Model code names axes ('embed', 'heads', ...); the rules here (or a
config's `rules`) map them to mesh axes (data, fsdp, tensor). Nothing is materialised unsharded:
shapes come from jax.eval_shape and parameters are created by a jit whose out_shardings are the targets."""

from __future__ import annotations

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
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


def make_mesh(shape, devices=None, dcn_shape: Sequence[int] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. `shape` is the mesh inside one slice (ICI); one entry may be -1 and is filled
    from the device count. `dcn_shape` (or shape={'ici': ..., 'dcn': ...}, a config's `mesh`) multiplies each axis
    across slices (DCN): multi-slice TPU pods group devices by slice, other platforms by process; -1 there is the
    number of such groups. On TPU the devices are laid out along the physical torus."""
    if hasattr(shape, "keys"):  # a dict or a config's ConfigDict
        unknown = set(shape.keys()) - {"ici", "dcn"}
        if unknown or "ici" not in shape:
            raise ValueError(f"mesh: expected keys 'ici' (and optionally 'dcn'), got {sorted(shape.keys())}")
        if dcn_shape is not None and shape.get("dcn") is not None:
            raise ValueError("mesh: give the DCN shape once, in the config or as dcn_shape")
        shape, dcn_shape = shape["ici"], shape.get("dcn", dcn_shape)
    devices = list(jax.devices() if devices is None else devices)
    groups = _granules(devices)
    dcn = [1, 1, 1]
    if dcn_shape is not None and (-1 in dcn_shape or int(np.prod(dcn_shape)) != 1):
        dcn = _fill("mesh dcn", dcn_shape, len(groups), "slices (processes off TPU)")
    if int(np.prod(dcn)) == 1:
        ici = _fill("mesh", shape, len(devices))
        if devices[0].platform == "tpu":
            return Mesh(mesh_utils.create_device_mesh(ici, devices), MESH_AXES)
        return Mesh(np.asarray(devices).reshape(ici), MESH_AXES)
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"slices hold different device counts {sorted(sizes)}; a hybrid mesh needs equal slices")
    ici = _fill("mesh ici", shape, sizes.pop())
    by_process = devices[0].platform != "tpu"
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process), MESH_AXES)


def _granule(device) -> int:
    """What DCN connects: slices on TPU (a single slice may leave slice_index unset), processes elsewhere."""
    if device.platform == "tpu":
        return getattr(device, "slice_index", None) or 0
    return device.process_index


def _granules(devices) -> list[list]:
    keys = sorted({_granule(d) for d in devices})
    return [[d for d in devices if _granule(d) == k] for k in keys]


def _fill(what: str, shape: Sequence[int], count: int, unit: str = "devices") -> list[int]:
    """`shape` with its one -1 replaced so that the product is `count`, or a clear error."""
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"{what} shape needs 3 entries for {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one {what} axis may be -1, got {shape}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if count % known:
            raise ValueError(f"{count} {unit} do not divide into {what} {shape}")
        shape[shape.index(-1)] = count // known
    if int(np.prod(shape)) != count:
        raise ValueError(f"{what} {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} {unit}, have {count}")
    return shape


def rules_from_config(config) -> tuple:
    """The logical-axis rules of a config (`config.rules`, a list of (logical name, mesh axes)), else the
    defaults; every mesh axis named must exist."""
    rules = tuple(
        (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
        for name, axes in config.get("rules", DEFAULT_RULES)
    )
    for name, axes in rules:
        unknown = {a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None} - set(MESH_AXES)
        if unknown:
            raise ValueError(f"rules: {name!r} -> {axes}: no mesh axis {sorted(unknown)}; the axes are {MESH_AXES}")
    return rules


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


def logical_sharding(mesh: Mesh, axes: Sequence[str | None], rules=DEFAULT_RULES) -> NamedSharding:
    """The NamedSharding of an array whose dimensions have the logical names `axes`."""
    return nn.logical_to_mesh_sharding(PartitionSpec(*axes), mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis as the rules place 'act_batch' (default: over data x fsdp), the rest replicated."""
    return logical_sharding(mesh, ("act_batch",) + (None,) * (ndim - 1), rules)


def cache_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """The KV cache [layers, batch, kv_heads, length, head_dim]: batch like activations, heads like the
    attention's kv_heads."""
    return logical_sharding(mesh, ("layers", "act_batch", "kv_heads", "act_length", None), rules)


def global_batch(local_batch, mesh: Mesh, rules=DEFAULT_RULES):
    """Global arrays from this process's rows of the batch (each process feeds only its own shard)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules), np.asarray(v))
        for k, v in local_batch.items()
    }


def initialize_distributed(**kwargs) -> bool:
    """Join the job's other processes (jax.distributed.initialize) when launched on several hosts: with
    explicit arguments, or when the launcher said so (ZIYA_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS); on TPU pods
    and SLURM jax finds the coordinator itself. Returns whether this is a multi-process run."""
    if jax.distributed.is_initialized():
        return True
    if not kwargs and not (os.environ.get("ZIYA_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return False
    jax.distributed.initialize(**kwargs)
    return True
