"""Parameter and config mapping between ziya_jax and Hugging Face transformers.

Targets: 'blip2' (Blip2ForConditionalGeneration), 'instructblip' (InstructBlipForConditionalGeneration), both with a
LlamaForCausalLM language model, and 'llama' (a bare LlamaForCausalLM). ziya_jax module names mirror the HF ones,
so a name maps mechanically: '/' -> '.', the stacked layer axis -> one tensor per layer, kernel [in, out] ->
weight [out, in], scale/embedding -> weight.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ziya_jax.config import LlamaConfig, ModelConfig, QFormerConfig, VisionConfig
from ziya_jax.tree import flatten, matches, unflatten

# ziya_jax parameters with no counterpart in a generation checkpoint of transformers.
PRETRAIN_ONLY = (
    "vision_proj",
    "text_proj",
    "itm_head",
    "temp",
    "qformer/lm_transform",
    "qformer/lm_layernorm",
    "qformer/lm_bias",
)


# Blip2ForConditionalGeneration's Q-Former has no text branch.
QFORMER_TEXT_BRANCH = (r"qformer/(word|position)_embeddings", r"qformer/layer/layer_\d+/(intermediate|output)")


class ConversionError(ValueError):
    """Tensors and config disagree; the message lists every missing, unexpected and mis-shaped key."""


def target_for(cfg: ModelConfig) -> str:
    return "instructblip" if cfg.variant == "chat" else "blip2"


def _exported(path, cfg: ModelConfig, target: str) -> bool:
    if "lora_a" in path or "lora_b" in path:
        return False
    if target == "llama":
        return path[0] == "language_model"
    return not matches(path, PRETRAIN_ONLY) and not (target == "blip2" and matches(path, QFORMER_TEXT_BRANCH))


def _leaf_name(leaf: str) -> str:
    return {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)


def hf_names(path: tuple[str, ...], cfg: ModelConfig, target: str) -> list[str] | str:
    """HF tensor name(s) of one ziya_jax parameter: a list (one per layer) for stacked layers."""
    top, rest, leaf = path[0], list(path[1:-1]), _leaf_name(path[-1])
    if top == "vision_model":
        if rest[0] == "layers":
            return [".".join(["vision_model.encoder.layers", str(i), *rest[1:], leaf]) for i in range(cfg.vision.depth)]
        return ".".join(["vision_model", *rest, leaf])
    if top == "qformer":
        if rest[0] == "layer":
            f = cfg.qformer.cross_attention_frequency
            j = int(rest[1].removeprefix("layer_"))
            return [
                ".".join(["qformer.encoder.layer", str(g * f + j), *rest[2:], leaf])
                for g in range(cfg.qformer.depth // f)
            ]
        if rest[0] == "layernorm" and target == "blip2":
            return f"qformer.layernorm.{leaf}"
        return ".".join(["qformer.embeddings", *rest, leaf])
    if top == "language_model":
        prefix = "" if target == "llama" else "language_model."
        if rest[0] == "lm_head":
            return f"{prefix}lm_head.{leaf}"
        if rest[0] == "layers":
            return [".".join([f"{prefix}model.layers", str(i), *rest[1:], leaf]) for i in range(cfg.llm.depth)]
        return ".".join([f"{prefix}model", *rest, leaf])
    return ".".join([top, *rest, leaf]) if len(path) > 1 else top


def _kind(path) -> str:
    if path[-1] != "kernel":
        return "same"
    return "patch" if "patch_embedding" in path else "linear"


def _to_hf(x: np.ndarray, kind: str, cfg: ModelConfig) -> np.ndarray:
    if kind == "linear":
        return np.swapaxes(x, -1, -2)
    if kind == "patch":
        p = cfg.vision.patch_size
        return x.reshape(p, p, 3, -1).transpose(3, 2, 0, 1)
    return x


def _from_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.swapaxes(x, -1, -2)
    if kind == "patch":
        return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    return x


def _hf_shape(shape, kind, cfg):
    if kind == "linear":
        return (*shape[:-2], shape[-1], shape[-2])
    if kind == "patch":
        p = cfg.vision.patch_size
        return (shape[-1], 3, p, p)
    return tuple(shape)


def expected_hf_shapes(abstract: Mapping, cfg: ModelConfig, target: str) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every exported parameter of a ziya_jax abstract (or real) parameter tree."""
    out = {}
    for path, leaf in flatten(abstract).items():
        if not _exported(path, cfg, target):
            continue
        names, shape = hf_names(path, cfg, target), tuple(leaf.shape)
        if isinstance(names, list):
            for n in names:
                out[n] = _hf_shape(shape[1:], _kind(path), cfg)
        else:
            out[names] = _hf_shape(shape, _kind(path), cfg)
    return out


def params_to_hf(params: Mapping, cfg: ModelConfig, target: str) -> dict[str, np.ndarray]:
    """ziya_jax parameters -> HF state dict (numpy). LoRA must be merged first (see merge_lora)."""
    tensors = {}
    for path, leaf in flatten(params).items():
        if "lora_a" in path:
            raise ConversionError(f"unmerged LoRA at {'/'.join(path)}: merge_lora the parameters before export")
        if not _exported(path, cfg, target):
            continue
        names, kind, x = hf_names(path, cfg, target), _kind(path), np.asarray(leaf)
        if isinstance(names, list):
            for i, n in enumerate(names):
                tensors[n] = np.ascontiguousarray(_to_hf(x[i], kind, cfg))
        else:
            tensors[names] = np.ascontiguousarray(_to_hf(x, kind, cfg))
    return tensors


def hf_to_params(tensors: Mapping[str, np.ndarray], abstract: Mapping, cfg: ModelConfig, target: str) -> dict:
    """HF state dict -> ziya_jax parameters shaped like `abstract` (checked: any missing, unexpected or
    mis-shaped key raises ConversionError listing them all)."""
    expected = expected_hf_shapes(abstract, cfg, target)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{n}: got {tuple(tensors[n].shape)}, config wants {expected[n]}"
        for n in set(expected) & set(tensors)
        if tuple(tensors[n].shape) != expected[n]
    )
    if missing or unexpected or misshaped:
        lines = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            lines += [f"  {title}: {item}" for item in items]
        raise ConversionError("\n".join(lines))
    flat = {}
    for path, leaf in flatten(abstract).items():
        if not _exported(path, cfg, target):
            continue
        names, kind = hf_names(path, cfg, target), _kind(path)
        dtype = leaf.dtype
        if isinstance(names, list):
            flat[path] = np.stack([_from_hf(np.asarray(tensors[n]), kind) for n in names]).astype(dtype)
        else:
            flat[path] = _from_hf(np.asarray(tensors[names]), kind).astype(dtype)
    return unflatten(flat)


# ---------------------------------------------------------------- configs


def _check(value, allowed, what):
    if value not in allowed:
        raise ConversionError(f"{what}={value!r} is not supported (supported: {allowed})")


def llama_config_from_hf(d: Mapping) -> LlamaConfig:
    _check(d.get("model_type", "llama"), ("llama",), "text_config.model_type")
    _check(d.get("hidden_act", "silu"), ("silu",), "text_config.hidden_act")
    rope = d.get("rope_parameters") or {}
    if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope scaling {d.get('rope_scaling') or rope} is not supported (default RoPE only)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ConversionError("LLaMA with attention_bias/mlp_bias is not supported")
    heads = d["num_attention_heads"]
    return LlamaConfig(
        vocab_size=d["vocab_size"],
        width=d["hidden_size"],
        depth=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        mlp_dim=d["intermediate_size"],
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        bos_token_id=d.get("bos_token_id") if d.get("bos_token_id") is not None else 1,
        eos_token_id=_first(d.get("eos_token_id", 2)),
        pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 0,
    )


def _first(x):
    return x[0] if isinstance(x, list) else x


def model_config_from_hf(d: Mapping, text_config: Mapping | None = None) -> ModelConfig:
    """ModelConfig from a Blip2/InstructBlip config.json (text_config may come from a separate LLaMA dir)."""
    _check(d.get("model_type"), ("blip-2", "instructblip"), "model_type")
    v, q = d["vision_config"], d["qformer_config"]
    _check(v.get("hidden_act", "gelu"), ("gelu",), "vision_config.hidden_act")
    _check(q.get("hidden_act", "gelu"), ("gelu",), "qformer_config.hidden_act")
    if not v.get("qkv_bias", True):
        raise ConversionError("vision_config.qkv_bias=False is not supported")
    text = text_config if text_config is not None else d.get("text_config")
    if not text:
        raise ConversionError("no text_config in config.json: give the LLaMA directory (--llm-dir)")
    chat = d["model_type"] == "instructblip"
    if d.get("image_token_index") is None:
        raise ConversionError("config.json has no image_token_index; set it to the LLM's image placeholder id")
    vision = VisionConfig(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        width=v["hidden_size"],
        depth=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        mlp_dim=v["intermediate_size"],
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )
    if q.get("encoder_hidden_size", vision.width) != vision.width:
        raise ConversionError(
            f"qformer_config.encoder_hidden_size={q['encoder_hidden_size']} != vision width {vision.width}"
        )
    qformer = QFormerConfig(
        width=q["hidden_size"],
        depth=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"],
        mlp_dim=q["intermediate_size"],
        cross_attention_frequency=q.get("cross_attention_frequency", 2),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12),
        dropout=q.get("hidden_dropout_prob", 0.1),
        text_branch=chat,
        vocab_size=q.get("vocab_size", 30522),
        max_position_embeddings=q.get("max_position_embeddings", 512),
    )
    # HF configs do not record the instruction length; InstructBLIP reads 128 tokens, if the Q-Former has them.
    return ModelConfig(
        variant="chat" if chat else "base",
        vision=vision,
        qformer=qformer,
        llm=llama_config_from_hf(text),
        num_query_tokens=d.get("num_query_tokens", 32),
        image_token_id=d["image_token_index"],
        instruction_len=min(ModelConfig.instruction_len, qformer.max_position_embeddings),
    )


def llama_config_to_hf(c: LlamaConfig) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.width,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.mlp_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "attention_bias": False,
        "mlp_bias": False,
    }


def model_config_to_hf(cfg: ModelConfig) -> dict:
    chat = cfg.variant == "chat"
    v, q = cfg.vision, cfg.qformer
    qformer = {
        "hidden_size": q.width,
        "num_hidden_layers": q.depth,
        "num_attention_heads": q.num_heads,
        "intermediate_size": q.mlp_dim,
        "cross_attention_frequency": q.cross_attention_frequency,
        "encoder_hidden_size": v.width,
        "layer_norm_eps": q.layer_norm_eps,
        "hidden_act": "gelu",
        "hidden_dropout_prob": q.dropout,
        "attention_probs_dropout_prob": q.dropout,
        "vocab_size": q.vocab_size,
        "max_position_embeddings": q.max_position_embeddings,
    }
    return {
        "model_type": "instructblip" if chat else "blip-2",
        "architectures": ["InstructBlipForConditionalGeneration" if chat else "Blip2ForConditionalGeneration"],
        "num_query_tokens": cfg.num_query_tokens,
        "image_token_index": cfg.image_token_id,
        "use_decoder_only_language_model": True,
        "vision_config": {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_size": v.width,
            "num_hidden_layers": v.depth,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.mlp_dim,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "gelu",
            "qkv_bias": True,
        },
        "qformer_config": qformer,
        "text_config": llama_config_to_hf(cfg.llm),
    }
