"""Ziya-Visual: ViT -> Q-Former -> projection -> LLaMA.

Images enter the LLM where their placeholders are: the text holds `num_query_tokens` copies of
`image_token_id` per image, and the i-th run of placeholders in a row receives that row's i-th image (as
transformers' Blip2/InstructBlip do with masked_scatter). Base feeds the Q-Former the learned queries alone;
Chat also feeds it the instruction text, and only the query outputs go on to the projection. Packed training rows
(several examples per row) give each image its own example's instruction, and segment ids and per-example
positions keep the examples apart in the LLM.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from ziya_jax.config import ModelConfig
from ziya_jax.model.layers import DEFAULT_INIT_STD, Dense, default_init, logical
from ziya_jax.model.llama import Llama
from ziya_jax.model.qformer import QFormer
from ziya_jax.model.vit import VisionTransformer
from ziya_jax.tree import flatten


def default_positions(attention_mask):
    """RoPE positions counted over valid tokens only, so left padding does not shift a row."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class ZiyaVisual(nn.Module):
    """unrolled: the layers of the ViT, the Q-Former and the LLM as separate modules, for ziya_jax.decode on
    decode_params."""

    cfg: ModelConfig
    unrolled: bool = False

    def setup(self):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        common = dict(
            lora=cfg.lora,
            dtype=dtype,
            param_dtype=param_dtype,
            remat_policy=cfg.remat_policy,
            scan_unroll=cfg.scan_unroll,
        )
        self.vision_model = VisionTransformer(cfg.vision, **common, unrolled=self.unrolled)
        self.qformer = QFormer(cfg.qformer, **common, unrolled=self.unrolled)
        self.query_tokens = self.param(
            "query_tokens",
            logical(default_init, (None, None, "embed")),
            (1, cfg.num_query_tokens, cfg.qformer.width),
            param_dtype,
        )
        self.language_projection = Dense(
            cfg.llm.width, ("qformer_embed", "embed"), lora=cfg.lora, dtype=dtype, param_dtype=param_dtype
        )
        self.language_model = Llama(cfg.llm, **common, unrolled=self.unrolled)
        if cfg.qformer.pretrain_heads:
            head = lambda n, axes: Dense(n, axes, lora=cfg.lora, dtype=dtype, param_dtype=param_dtype)
            self.vision_proj = head(cfg.qformer.embed_dim, ("embed", None))
            self.text_proj = head(cfg.qformer.embed_dim, ("embed", None))
            self.itm_head = head(2, ("embed", None))
            self.temp = self.param("temp", nn.initializers.constant(0.07), (), jnp.float32)

    def encode_images(self, pixel_values, qformer_ids=None, qformer_mask=None, deterministic: bool = True):
        """pixel_values [B, N, H, W, 3] (normalised) -> LLM-ready image embeddings [B, N * Q, llm width].
        For Chat, qformer_ids/qformer_mask is the instruction: [B, T], one per row for all its images, or
        [B, N, T], one per image (packed rows)."""
        b, n = pixel_values.shape[:2]
        image_embeds = self.vision_model(pixel_values.reshape(b * n, *pixel_values.shape[2:]), deterministic)
        queries = jnp.broadcast_to(self.query_tokens, (b * n, *self.query_tokens.shape[1:]))
        if self.cfg.variant == "chat":
            if qformer_ids is None:
                raise ValueError("the Chat variant needs qformer_ids (the instruction in Q-Former tokens)")
            per_image = lambda x: x.reshape(b * n, -1) if x.ndim == 3 else jnp.repeat(x, n, axis=0)
            qformer_ids = per_image(qformer_ids)
            qformer_mask = None if qformer_mask is None else per_image(qformer_mask)
        else:
            qformer_ids = qformer_mask = None
        hidden = self.qformer(queries, qformer_ids, qformer_mask, image_embeds, "bidirectional", deterministic)
        features = self.language_projection(hidden[:, : self.cfg.num_query_tokens], deterministic)
        return features.reshape(b, n * self.cfg.num_query_tokens, -1)

    def embed_inputs(self, input_ids, image_features=None):
        """Token embeddings with the image placeholders replaced, in order, by image_features [B, M, W]."""
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            return embeds
        is_image = input_ids == self.cfg.image_token_id
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
        gathered = jnp.take_along_axis(image_features, index[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)

    def language(
        self,
        embeds,
        positions,
        key_mask,
        cache=None,
        cache_index=None,
        deterministic: bool = True,
        last_only: bool = False,
        segment_ids=None,
        logits_at=None,
    ):
        """The LLM alone on embeddings (prefill and cached decode steps)."""
        return self.language_model(
            embeds, positions, key_mask, cache, cache_index, deterministic, last_only, segment_ids, logits_at
        )

    def __call__(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        qformer_ids=None,
        qformer_mask=None,
        positions=None,
        deterministic: bool = True,
        segment_ids=None,
    ):
        """Full forward -> logits [B, T, vocab] (float32). Packed rows pass segment_ids [B, T] (0 on padding,
        k on the k-th example's tokens) and positions counted from 0 in each example."""
        features = None
        if pixel_values is not None:
            features = self.encode_images(pixel_values, qformer_ids, qformer_mask, deterministic)
        embeds = self.embed_inputs(input_ids, features)
        if positions is None:
            positions = default_positions(attention_mask)
        logits, _ = self.language(
            embeds, positions, attention_mask, deterministic=deterministic, segment_ids=segment_ids
        )
        return logits

    def initialize(self, input_ids, pixel_values, qformer_ids):
        """Touches every parameter (init only): the forward pass plus the stage-1 heads when configured."""
        logits = self(input_ids, jnp.ones_like(input_ids), pixel_values, qformer_ids)
        if self.cfg.qformer.pretrain_heads:
            hidden = self.qformer(None, qformer_ids, None, None)
            logits = logits.sum() + self.qformer.text_logits(hidden).sum() + self.temp
            logits += self.vision_proj(hidden).sum() + self.text_proj(hidden).sum() + self.itm_head(hidden).sum()
        return logits


def dummy_inputs(cfg: ModelConfig, batch: int = 1, text_len: int = 4):
    """Smallest inputs that reach every parameter (for init and eval_shape)."""
    size = cfg.vision.image_size
    input_ids = jnp.full((batch, cfg.num_query_tokens + text_len), cfg.image_token_id, jnp.int32)
    input_ids = input_ids.at[:, cfg.num_query_tokens :].set(0)
    pixels = jnp.zeros((batch, 1, size, size, 3), jnp.float32)
    qformer_ids = jnp.zeros((batch, text_len), jnp.int32) if cfg.qformer.text_branch else None
    return input_ids, pixels, qformer_ids


# Every normal-initialised weight is drawn from default_init, normal(0.02); init_fn rescales each to its
# tower's initializer_range. Keys are the top-level parameter names and the weight's own name.
_NORMAL_INIT = ("kernel", "embedding", "class_embedding", "position_embedding", "query_tokens")
_TOWER = {
    "vision_model": "vision",
    "qformer": "qformer",
    "query_tokens": "qformer",
    "vision_proj": "qformer",
    "text_proj": "qformer",
    "itm_head": "qformer",
    "language_model": "llm",
    "language_projection": "llm",
}


def init_std(cfg: ModelConfig, path: tuple[str, ...]) -> float | None:
    """The init std of the weight at `path` (None for weights not drawn from default_init: biases, norms,
    LoRA factors, the temperature)."""
    if path[-1] not in _NORMAL_INIT:
        return None
    if path[0] == "vision_model" and path[-1] == "position_embedding":
        return cfg.vision.position_initializer_range
    return getattr(cfg, _TOWER[path[0]]).initializer_range


def init_fn(cfg: ModelConfig):
    """rng -> boxed parameters (with logical axis names) of a fresh model."""
    model = ZiyaVisual(cfg)

    def rescale(path, x):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        std = init_std(cfg, names)
        return x if std is None or std == DEFAULT_INIT_STD else x * (std / DEFAULT_INIT_STD)

    def fresh(rng):
        params = model.init(rng, *dummy_inputs(cfg), method=ZiyaVisual.initialize)["params"]
        return jax.tree_util.tree_map_with_path(rescale, params)

    return fresh


def init_params(cfg: ModelConfig, rng):
    """Unboxed parameters (plain nested dicts of arrays); see ziya_jax.sharding for sharded init."""
    return nn.meta.unbox(_jitted_init(cfg)(rng))


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg: ModelConfig):
    """One compiled initialiser per config (compiling it costs more than running it)."""
    abstract_params(cfg)  # validates the LoRA targets
    return jax.jit(init_fn(cfg))


def abstract_params(cfg: ModelConfig):
    """ShapeDtypeStructs of every parameter, boxed with their logical axis names; nothing is allocated.
    Raises if a LoRA target matches no layer (a typo would otherwise silently train without adapters)."""
    params = jax.eval_shape(init_fn(cfg), jax.random.key(0))
    if cfg.lora.rank:
        paths = ["/".join(p[:-1]) for p in flatten(nn.meta.unbox(params)) if p[-1] == "lora_a"]
        unused = [t for t in cfg.lora.targets if not any(re.fullmatch(t, p) for p in paths)]
        if unused:
            raise ValueError(f"model.lora.targets {unused} match no Dense layer")
    return params
