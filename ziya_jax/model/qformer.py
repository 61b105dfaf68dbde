"""BLIP-2 Q-Former: BERT layers over [learned queries; optional text], cross-attending to image features on
every `cross_attention_frequency`-th layer, with separate FFNs for query and text positions.

Attention modes (static):
- 'bidirectional': every position attends to every valid position (ITM, the Chat instruction, queries alone,
  text alone for ITC);
- 'causal_text': queries attend to queries only; text attends to all queries and causally to earlier text (ITG).
Layers are scanned in groups of `cross_attention_frequency` (the first of each group has cross-attention).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ziya_jax.config import LoraConfig, QFormerConfig
from ziya_jax.model.layers import Dense, LayerNorm, attention, default_init, logical, scan_layers

ATTENTION_MODES = ("bidirectional", "causal_text")


class BertAttention(nn.Module):
    """Multi-head attention + output dense + residual LayerNorm (post-LN), HF names attention/output."""

    cfg: QFormerConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, kv, mask, deterministic):
        cfg = self.cfg
        heads = lambda y: y.reshape(*y.shape[:2], cfg.num_heads, cfg.width // cfg.num_heads)
        q, k, v = _Projections(cfg, self.lora, self.dtype, self.param_dtype, name="attention")(x, kv, deterministic)
        rng = self.make_rng("dropout") if not deterministic and cfg.dropout > 0 else None
        out = attention(heads(q), heads(k), heads(v), mask, rng, cfg.dropout)
        return _Output(cfg, self.lora, self.dtype, self.param_dtype, name="output")(
            out.reshape(x.shape), x, deterministic
        )


class _Projections(nn.Module):
    cfg: QFormerConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, kv, deterministic):
        dense = lambda name: Dense(
            self.cfg.width,
            ("embed", "heads"),
            lora=self.lora,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        return (dense("query")(x, deterministic), dense("key")(kv, deterministic), dense("value")(kv, deterministic))


class _Output(nn.Module):
    """dense -> dropout -> LayerNorm(h + residual); used after attention (width in) and FFN (mlp in)."""

    cfg: QFormerConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    in_axis: str = "heads"

    @nn.compact
    def __call__(self, h, residual, deterministic):
        h = Dense(
            self.cfg.width,
            (self.in_axis, "embed"),
            lora=self.lora,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dense",
        )(h, deterministic)
        h = nn.Dropout(self.cfg.dropout)(h, deterministic=deterministic)
        return LayerNorm(self.cfg.layer_norm_eps, self.dtype, self.param_dtype, name="LayerNorm")(h + residual)


class _Intermediate(nn.Module):
    cfg: QFormerConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, deterministic):
        h = Dense(
            self.cfg.mlp_dim,
            ("embed", "mlp"),
            lora=self.lora,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dense",
        )(x, deterministic)
        return nn.gelu(h, approximate=False)


class QFormerLayer(nn.Module):
    cfg: QFormerConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    cross_attention: bool

    @nn.compact
    def __call__(self, x, num_queries, image_embeds, mask, deterministic):
        args = (self.cfg, self.lora, self.dtype, self.param_dtype)
        x = BertAttention(*args, name="attention")(x, x, mask, deterministic)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        outs = []
        if num_queries:
            if self.cross_attention:
                queries = BertAttention(*args, name="crossattention")(queries, image_embeds, None, deterministic)
            h = _Intermediate(*args, name="intermediate_query")(queries, deterministic)
            outs.append(_Output(*args, in_axis="mlp", name="output_query")(h, queries, deterministic))
        if self.cfg.text_branch:
            h = _Intermediate(*args, name="intermediate")(text, deterministic)
            outs.append(_Output(*args, in_axis="mlp", name="output")(h, text, deterministic))
        return jnp.concatenate(outs, axis=1)


class QFormerGroup(nn.Module):
    """`cross_attention_frequency` consecutive layers; the first cross-attends. HF layer index =
    group * frequency + j for the sub-layer named layer_{j}."""

    cfg: QFormerConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, num_queries, image_embeds, mask, deterministic):
        for j in range(self.cfg.cross_attention_frequency):
            x = QFormerLayer(
                self.cfg, self.lora, self.dtype, self.param_dtype, cross_attention=(j == 0), name=f"layer_{j}"
            )(x, num_queries, image_embeds, mask, deterministic)
        return x, None


def qformer_mask(num_queries: int, text_mask, mode: str):
    """Boolean [B, Q+T, Q+T] attention mask for the given mode; text_mask [B, T] marks valid text."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown Q-Former attention mode {mode!r}; choose one of {ATTENTION_MODES}")
    b, t = text_mask.shape
    valid = jnp.concatenate([jnp.ones((b, num_queries), bool), text_mask.astype(bool)], axis=1)
    n = num_queries + t
    if mode == "bidirectional":
        return jnp.broadcast_to(valid[:, None, :], (b, n, n))
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    allowed = jnp.where(i < num_queries, j < num_queries, (j < num_queries) | (j <= i))
    return allowed[None] & valid[:, None, :]


class QFormer(nn.Module):
    """Parameters mirror HF: embeddings/{layernorm, word_embeddings, position_embeddings}, encoder/layer
    (stacked groups), and with pretrain heads the ITG head `cls` (transform + bias, decoder tied to the word
    embeddings). unrolled: one module per group (layer_0 ... , see layers.unroll_layers), for decoding."""

    cfg: QFormerConfig
    lora: LoraConfig = LoraConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_unroll: int = 1
    unrolled: bool = False

    def setup(self):
        cfg = self.cfg
        self.layernorm = LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype)
        if cfg.text_branch:
            embed = lambda n: nn.Embed(
                n,
                cfg.width,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                embedding_init=logical(default_init, ("qformer_vocab", "embed")),
            )
            self.word_embeddings = embed(cfg.vocab_size)
            self.position_embeddings = embed(cfg.max_position_embeddings)
        groups, args = cfg.depth // cfg.cross_attention_frequency, (cfg, self.lora, self.dtype, self.param_dtype)
        if self.unrolled:
            self.layer = [QFormerGroup(*args) for _ in range(groups)]
        else:
            stack = scan_layers(
                QFormerGroup,
                groups,
                self.remat_policy,
                self.scan_unroll,
                in_axes=(nn.broadcast,) * 4,
                static_argnums=(2, 5),
            )
            self.layer = stack(*args)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.pretrain_heads:
            self.lm_transform = Dense(
                cfg.width, ("embed", "embed_out"), lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype
            )
            self.lm_layernorm = LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype)
            self.lm_bias = self.param(
                "lm_bias", logical(nn.initializers.zeros, ("qformer_vocab",)), (cfg.vocab_size,), self.param_dtype
            )

    def __call__(
        self,
        queries,
        text_ids=None,
        text_mask=None,
        image_embeds=None,
        mode: str = "bidirectional",
        deterministic: bool = True,
    ):
        """queries [B, Q, W] or None; text_ids/text_mask [B, T] or None; image_embeds [B, N, Wv] (needed when
        there are queries). -> hidden states [B, Q + T, W]."""
        parts = [] if queries is None else [queries.astype(self.dtype)]
        num_queries = 0 if queries is None else queries.shape[1]
        if text_ids is not None:
            if not self.cfg.text_branch:
                raise ValueError("this Q-Former has no text branch (model.qformer.text_branch=False)")
            if text_ids.shape[-1] > self.cfg.max_position_embeddings:  # a lookup past the table gives NaN
                raise ValueError(
                    f"Q-Former text of {text_ids.shape[-1]} tokens; the Q-Former has "
                    f"{self.cfg.max_position_embeddings} positions"
                )
            positions = jnp.arange(text_ids.shape[1])
            parts.append(self.word_embeddings(text_ids) + self.position_embeddings(positions)[None])
        else:
            text_mask = jnp.zeros((parts[0].shape[0], 0), bool)
        if text_mask is None:
            text_mask = jnp.ones(text_ids.shape, bool)
        x = self.dropout(self.layernorm(jnp.concatenate(parts, axis=1)), deterministic=deterministic)
        mask = qformer_mask(num_queries, text_mask, mode)
        for group in self.layer if self.unrolled else [self.layer]:
            x, _ = group(x, num_queries, image_embeds, mask, deterministic)
        return x

    def text_logits(self, hidden, deterministic: bool = True):
        """ITG head over text hidden states: transform (dense, GELU, LayerNorm), tied decoder, bias."""
        h = nn.gelu(self.lm_transform(hidden, deterministic), approximate=False)
        return (self.word_embeddings.attend(self.lm_layernorm(h)) + self.lm_bias).astype(jnp.float32)
