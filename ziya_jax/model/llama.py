"""LLaMA decoder: RMSNorm, RoPE (rotate_half), grouped-query attention, SwiGLU, scanned layers, KV cache.

Causality is over cache slots, padding over a key mask and RoPE over per-row positions, so the same code runs a
full forward (slot = position in the sequence), left-padded batches, packed rows (several examples per row,
kept apart by segment ids) and cached decoding one token at a time.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ziya_jax.config import LlamaConfig, LoraConfig
from ziya_jax.model.layers import Dense, RMSNorm, attention, default_init, logical, rotary, scan_layers


class LlamaAttention(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_index, deterministic):
        cfg = self.cfg
        b, t, _ = x.shape
        dense = lambda n, name, axes: Dense(
            n, axes, use_bias=False, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        q = dense(cfg.num_heads * cfg.head_dim, "q_proj", ("embed", "heads"))(x, deterministic)
        k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", ("embed", "kv_heads"))(x, deterministic)
        v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", ("embed", "kv_heads"))(x, deterministic)
        q = rotary(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rotary(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cache is not None:  # [B, kv_heads, S, head_dim]: the score dot reads K without a transpose
            write = lambda c, x: (
                c.at[jnp.arange(b), :, cache_index].set(x[:, 0].astype(c.dtype))  # one token a row, own slot
                if jnp.ndim(cache_index)
                else jax.lax.dynamic_update_slice_in_dim(c, x.swapaxes(1, 2).astype(c.dtype), cache_index, 2)
            )
            cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
            k, v = cache["k"].swapaxes(1, 2), cache["v"].swapaxes(1, 2)
        out = attention(q, k.astype(self.dtype), v.astype(self.dtype), mask)
        out = dense(cfg.width, "o_proj", ("heads", "embed"))(out.reshape(b, t, -1), deterministic)
        return out, cache


class LlamaMLP(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, deterministic):
        dense = lambda n, name, axes: Dense(
            n, axes, use_bias=False, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        gate = dense(self.cfg.mlp_dim, "gate_proj", ("embed", "mlp"))(x, deterministic)
        up = dense(self.cfg.mlp_dim, "up_proj", ("embed", "mlp"))(x, deterministic)
        return dense(self.cfg.width, "down_proj", ("mlp", "embed"))(nn.silu(gate) * up, deterministic)


class LlamaLayer(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cache, positions, mask, cache_index, deterministic):
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        norm = lambda name: RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        h, cache = LlamaAttention(self.cfg, self.lora, self.dtype, self.param_dtype, name="self_attn")(
            norm("input_layernorm")(x), positions, mask, cache, cache_index, deterministic
        )
        x = x + h
        x = x + LlamaMLP(self.cfg, self.lora, self.dtype, self.param_dtype, name="mlp")(
            norm("post_attention_layernorm")(x), deterministic
        )
        return x, cache


class Llama(nn.Module):
    """LlamaForCausalLM. Parameters: embed_tokens, layers (stacked), norm, lm_head (absent when tied).

    unrolled: one module per layer (parameters layers_0 ... layers_{depth-1}, see layers.unroll_layers; cache a list of
    per-layer {'k','v'}), for decoding: each step then reads every weight in place, where the scanned stack
    slices (on CPU: copies) each layer's weights out first.
    """

    cfg: LlamaConfig
    lora: LoraConfig = LoraConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_unroll: int = 1
    unrolled: bool = False

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=logical(default_init, ("vocab", "embed")),
        )
        if self.unrolled:
            self.layers = [LlamaLayer(cfg, self.lora, self.dtype, self.param_dtype) for _ in range(cfg.depth)]
        else:
            stack = scan_layers(
                LlamaLayer,
                cfg.depth,
                self.remat_policy,
                self.scan_unroll,
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                static_argnums=(6,),
            )
            self.layers = stack(cfg, self.lora, self.dtype, self.param_dtype)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(
                cfg.vocab_size,
                ("embed", "vocab"),
                use_bias=False,
                lora=self.lora,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        embeds,
        positions,
        key_mask,
        cache=None,
        cache_index=None,
        deterministic=True,
        last_only=False,
        segment_ids=None,
        logits_at=None,
    ):
        """embeds [B, T, W]; positions [B, T]; key_mask [B, S] (S = T, or the cache length when decoding);
        cache {'k','v': [layers, B, kv_heads, S, head_dim]} (unrolled: a list of {'k','v': [B, kv_heads, S, ...]})
        written at slot cache_index (an int, or [B] ints with T = 1: each row at its own slot); segment_ids [B, T]
        (packed rows, full forward only): tokens attend only within their own segment. -> (logits f32 [B, T,
        vocab], or [B, 1, vocab] of the last token with last_only, or of token logits_at [B] of each row, all a
        prefill needs, cache)."""
        x = embeds.astype(self.dtype)
        cache_index = 0 if cache is None else cache_index
        mask = attention_mask(key_mask, x.shape[1], cache_index, segment_ids)
        if self.unrolled:
            caches = []
            for layer, c in zip(self.layers, cache or [None] * self.cfg.depth):
                x, c = layer(x, c, positions, mask, cache_index, deterministic)
                caches.append(c)
            cache = None if cache is None else caches
        else:
            x, cache = self.layers(x, cache, positions, mask, cache_index, deterministic)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.norm(x[:, -1:] if last_only else x)
        if self.cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x, deterministic)
        return logits.astype(jnp.float32), cache


def attention_mask(key_mask, length: int, first_slot=0, segment_ids=None):
    """bool [B, T, S], made once for all layers: the query at cache slot first_slot + i (i < length; first_slot an
    int or one per row [B]) sees the keys at slots up to its own that key_mask [B, S] marks valid and, given
    segment_ids [B, T] (a full forward, S = T), only those of its own segment."""
    query_slot = jnp.reshape(first_slot, (-1, 1)) + jnp.arange(length)  # [1 or B, T]
    causal = query_slot[:, :, None] >= jnp.arange(key_mask.shape[1])
    mask = causal & key_mask[:, None, :].astype(bool)
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32, unrolled: bool = False):
    """An empty KV cache of `length` slots for every layer: stacked, or a list of per-layer caches."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    if unrolled:
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.depth)]
    return {"k": jnp.zeros((cfg.depth, *shape), dtype), "v": jnp.zeros((cfg.depth, *shape), dtype)}
