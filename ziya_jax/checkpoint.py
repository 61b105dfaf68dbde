"""Model checkpoints: an Orbax directory holding the parameters and the model config that built them.

Used by the converter (from-hf writes one, to-hf reads one) and by anything that needs a model without its
training state. Restoring goes straight into given shardings, so a model never has to fit on one device.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from ziya_jax.config import ModelConfig
from ziya_jax.model import abstract_params
from ziya_jax.tree import flatten, unflatten


def save_model(path: str, params, cfg: ModelConfig) -> None:
    """Write params + config to a new directory `path` (refuses to overwrite an existing one)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new checkpoint directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            ocp.args.Composite(params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(cfg.to_dict())),
        )


def load_model_config(path: str) -> ModelConfig:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(path, ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    except Exception as e:  # a folder that is not a model checkpoint, or a damaged one
        raise ValueError(f"{path}: not a readable ziya_jax model (no model_config: {type(e).__name__})") from None
    if not isinstance(restored["model_config"], dict):
        raise ValueError(f"{path}: model_config is not a JSON object")
    return ModelConfig.from_dict(restored["model_config"])


def load_model(path: str, shardings=None, dtype: str | None = None, mesh=None) -> tuple[dict, ModelConfig]:
    """(params, config) from `path`. `shardings` (a tree like the params) places each array as it is read;
    `mesh` derives them from the model's logical axes (sharding.param_shardings). `dtype` stores (and computes)
    the weights in that dtype. Arrays are read one at a time and cast as they are read, so the host never holds
    more than one of them in the saved dtype. A checkpoint that cannot be read is a ValueError."""
    cfg = load_model_config(path)
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    if mesh is not None:
        from ziya_jax.sharding import param_shardings

        shardings = param_shardings(cfg, mesh)
    abstract = nn.meta.unbox(abstract_params(cfg))
    if shardings is None:
        shardings = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params = {}
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            for key, leaf in flatten(abstract).items():
                item = unflatten({key: leaf})
                restored = ckptr.restore(
                    os.path.abspath(path),
                    ocp.args.Composite(
                        params=ocp.args.PyTreeRestore(
                            item=item,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                            partial_restore=True,
                        )
                    ),
                )
                params[key] = flatten(restored["params"])[key]
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged file; say which file
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: cannot read the model's parameters ({type(e).__name__}: {first:.300})") from None
    return unflatten(params), cfg
