"""Model checkpoints: an Orbax directory holding the parameters and the model config that built them.

Used by the converter (from-hf writes one, to-hf reads one) and by anything that needs a model without its
training state. Restoring goes straight into given shardings, so a model never has to fit on one device.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from ziya_jax.config import ModelConfig
from ziya_jax.model import abstract_params


def save_model(path: str, params, cfg: ModelConfig) -> None:
    """Write params + config to a new directory `path` (refuses to overwrite an existing one)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new checkpoint directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            model_config=ocp.args.JsonSave(cfg.to_dict())))


def load_model_config(path: str) -> ModelConfig:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return ModelConfig.from_dict(restored["model_config"])


def load_model(path: str, shardings=None) -> tuple[dict, ModelConfig]:
    """(params, config) from `path`; `shardings` (a tree like the params) places each array as it is read."""
    cfg = load_model_config(path)
    abstract = nn.meta.unbox(abstract_params(cfg))
    if shardings is not None:
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract, shardings)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(os.path.abspath(path),
                                 ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    return restored["params"], cfg
