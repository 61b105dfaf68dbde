"""Hugging Face <-> ziya_jax conversion (library API; the CLI is `python -m ziya_jax.convert`)."""

from __future__ import annotations

import os

import flax.linen as nn

from ziya_jax.config import ModelConfig
from ziya_jax.convert.hf import (
    ConversionError,
    hf_to_params,
    llama_config_to_hf,
    model_config_from_hf,
    model_config_to_hf,
    params_to_hf,
    target_for,
)
from ziya_jax.convert.io import apply_llama_delta, read_config, read_tensors, write_hf_dir
from ziya_jax.model import abstract_params
from ziya_jax.model.layers import merge_lora


def load_hf(
    hf_dir: str,
    llm_dir: str | None = None,
    llm_delta_dir: str | None = None,
    allow_pickle: bool = False,
    image_token_id: int | None = None,
) -> tuple[dict, ModelConfig]:
    """Parameters and config from a Blip2/InstructBlip directory. With llm_dir, the language model comes from
    that LlamaForCausalLM directory (the original Ziya layout: vision side and LLaMA apart); with
    llm_delta_dir, llm_dir is the base LLaMA and the delta is merged into it first."""
    if llm_delta_dir is not None and llm_dir is None:
        raise ConversionError("--llm-delta-dir needs --llm-dir (the base LLaMA the delta applies to)")
    config = read_config(hf_dir)
    if image_token_id is not None:
        config["image_token_index"] = image_token_id
    text_config = read_config(llm_delta_dir or llm_dir) if llm_dir is not None else None
    try:  # the configs first: a bad one is refused before any weights are read
        cfg = model_config_from_hf(config, text_config)
    except (KeyError, TypeError, AttributeError) as e:  # a key missing, or a value of the wrong kind
        read = [hf_dir] + ([llm_delta_dir or llm_dir] if llm_dir else [])
        where = " or ".join(os.path.join(d, "config.json") for d in read)
        what = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else f"unexpected structure ({e})"
        raise ConversionError(f"{where}: {what}") from None
    tensors = read_tensors(hf_dir, allow_pickle)
    if llm_dir is not None:
        llm = read_tensors(llm_dir, allow_pickle)
        if llm_delta_dir is not None:
            llm = apply_llama_delta(llm, read_tensors(llm_delta_dir, allow_pickle))
        clash = [k for k in tensors if k.startswith("language_model.")]
        if clash:
            raise ConversionError(f"{hf_dir} already holds a language model ({clash[0]}, ...); drop --llm-dir")
        tensors.update({f"language_model.{k}": v for k, v in llm.items()})
    abstract = nn.meta.unbox(abstract_params(cfg))
    return hf_to_params(tensors, abstract, cfg, target_for(cfg)), cfg


def export_hf(
    params, cfg: ModelConfig, out_dir: str, llm_only: bool = False, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write a directory transformers loads with from_pretrained (Blip2/InstructBlip, or with llm_only a bare
    LlamaForCausalLM). LoRA is merged first. Returns notes on what was merged or left out."""
    notes = []
    if cfg.lora.rank:
        params = merge_lora(params, cfg.lora)
        notes.append(f"merged LoRA (rank {cfg.lora.rank}) into the base kernels")
    target = "llama" if llm_only else target_for(cfg)
    tensors = params_to_hf(params, cfg, target)
    if not llm_only and (cfg.qformer.pretrain_heads or (cfg.variant == "base" and cfg.qformer.text_branch)):
        notes.append(
            "left out the stage-1 heads / Q-Former text branch (no place for them in "
            f"{target_for(cfg)} generation checkpoints)"
        )
    config = llama_config_to_hf(cfg.llm) if llm_only else model_config_to_hf(cfg)
    write_hf_dir(out_dir, tensors, config, max_shard_bytes)
    return notes


__all__ = [
    "ConversionError",
    "load_hf",
    "export_hf",
    "params_to_hf",
    "hf_to_params",
    "apply_llama_delta",
    "read_tensors",
    "write_hf_dir",
]
