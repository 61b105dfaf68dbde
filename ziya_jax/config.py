"""Model configuration: frozen dataclasses built from the `model` section of an ml_collections config.

Flax modules need hashable fields, so the ConfigDict of a config file is turned into these dataclasses once,
and turned back into a plain dict when it is saved beside a checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA for every Dense whose module path (e.g. `language_model/layers/self_attn/q_proj`) fully matches
    one of `targets` (regular expressions). rank 0 means no LoRA anywhere."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    # Std of the normal init of fresh weights (HF's initializer_range; applied by ziya_jax.model.ziya.init_fn, the
    # whole model's initialiser). The position embedding has its own: a ViT trained from scratch needs positions
    # about as large as the patch embeddings, or attention over its tokens (the Q-Former's queries) cannot tell
    # the cells of the image apart (see configs/demo.py).
    initializer_range: float = 0.02
    position_initializer_range: float = 0.02


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    # The text branch (word/position embeddings and the text FFNs) is needed by stage-1 pre-training and by
    # the instruction-aware (Chat) Q-Former; Blip2-style inference does not have it.
    text_branch: bool = False
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    # Stage-1 heads: vision_proj, text_proj, itm_head, temperature and the ITG language-model head.
    pretrain_heads: bool = False
    embed_dim: int = 256
    initializer_range: float = 0.02  # also for the query tokens and the stage-1 heads


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 39424
    width: int = 5120
    depth: int = 40
    num_heads: int = 40
    num_kv_heads: int = 40
    head_dim: int = 128
    mlp_dim: int = 13824
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02  # also for the language projection


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Ziya-Visual model. variant 'base' = BLIP-2 style, 'chat' = instruction-aware Q-Former."""

    variant: str = "base"
    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    llm: LlamaConfig = LlamaConfig()
    lora: LoraConfig = LoraConfig()
    num_query_tokens: int = 32
    image_token_id: int = 39423
    # Chat: Q-Former tokens of the instruction, [CLS] and [SEP] included (InstructBLIP: 128). Training data and
    # every inference path cut the instruction to this length, so the model reads what it was trained on.
    instruction_len: int = 128
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # none | full | dots | dots_no_batch
    # Layers per iteration of each scanned layer stack (>= depth: straight-line code). Scanning keeps a deep
    # model's compile time flat; unrolling a shallow one lets XLA fuse across layers (the demo's stage-2 step on
    # 2 CPU cores: 13% faster).
    scan_unroll: int = 1

    def __post_init__(self):
        if self.variant not in ("base", "chat"):
            raise ValueError(f"model.variant must be 'base' or 'chat', got {self.variant!r}")
        if self.variant == "chat" and not self.qformer.text_branch:
            raise ValueError(
                "model.variant='chat' needs model.qformer.text_branch=True (the instruction enters the Q-Former)"
            )
        if self.qformer.pretrain_heads and not self.qformer.text_branch:
            raise ValueError("model.qformer.pretrain_heads needs model.qformer.text_branch (ITC/ITG read text)")
        if self.variant == "chat" and not 3 <= self.instruction_len <= self.qformer.max_position_embeddings:
            raise ValueError(
                f"model.instruction_len={self.instruction_len} must be >= 3 and at most the Q-Former's "
                f"{self.qformer.max_position_embeddings} positions (model.qformer.max_position_embeddings)"
            )
        if self.qformer.depth % self.qformer.cross_attention_frequency:
            raise ValueError(
                f"qformer.depth={self.qformer.depth} must be a multiple of "
                f"cross_attention_frequency={self.qformer.cross_attention_frequency}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        if self.scan_unroll < 1:
            raise ValueError(f"model.scan_unroll must be >= 1, got {self.scan_unroll}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        sub = {"vision": VisionConfig, "qformer": QFormerConfig, "llm": LlamaConfig, "lora": LoraConfig}
        for key, sub_cls in sub.items():
            if key in d:
                d[key] = _build(sub_cls, d[key], f"model.{key}")
        return _build(cls, d, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _build(cls, d, where):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown)}; known: {sorted(names)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


def load_config(spec: str):
    """An ml_collections config from 'path/to/file.py[:arg]' (the file defines get_config(arg))."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    spec_ = importlib.util.spec_from_file_location(f"_ziya_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def sibling(config_file: str, name: str):
    """The module `name`.py in the folder of `config_file` (a config's shared settings, e.g. configs/common.py),
    imported by path: config files are loaded by path too, so no package or sys.path entry is needed."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    key = f"_ziya_config_{name}_{abs(hash(path))}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def parse_arg(arg: str | None, **defaults) -> dict[str, Any]:
    """'stage=3,variant=chat' -> dict, typed like the defaults; unknown keys are an error."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = kind(value)
    return out


def for_stage(model: dict[str, Any], stage: int, lora_targets: tuple[str, ...], lora_rank: int) -> dict[str, Any]:
    """The model section as a training stage needs it (paper, section 3): every stage has the Q-Former text
    branch and the stage-1 heads (ITC/ITM/ITG), trained in stage 1 and kept, frozen, after it, so that a model
    of any stage can still do retrieval; Base feeds the Q-Former no text in stages 2 and 3, Chat feeds it the
    instruction; stage 3 adds LoRA on the ViT and the LLM for Chat."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    model = dict(model, qformer=dict(model.get("qformer", {})))
    chat = model.get("variant") == "chat"
    model["qformer"]["text_branch"] = True
    model["qformer"]["pretrain_heads"] = True
    if stage == 3 and chat:
        model["lora"] = dict(rank=lora_rank, alpha=2.0 * lora_rank, dropout=0.05, targets=tuple(lora_targets))
    return model


def override(config, assignment: str) -> None:
    """Apply 'a.b.c=value' to an ml_collections config in place. The key must exist (a typo is an error, not
    a silently added key); the value is parsed as a Python literal unless the existing value is a string."""
    import ast

    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise ValueError(f"override {assignment!r} is not KEY=VALUE")
    keys = path.split(".")
    node = config
    for i, key in enumerate(keys):
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        if key not in known:
            where = ".".join(keys[:i]) or "the config"
            raise KeyError(f"unknown config key {path!r}: {where} has no {key!r} (known: {known})")
        if i < len(keys) - 1:
            node = node[key]
    leaf = keys[-1]
    old = node[leaf]
    if isinstance(old, str):
        value = text
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"override {assignment!r}: {text!r} is not a Python literal") from None
    try:
        node[leaf] = value  # ConfigDict checks the type (an int may become a float, nothing else changes type)
    except TypeError as e:
        raise ValueError(f"override {assignment!r}: {e}") from None
