"""LLaMA decoder: RMSNorm, RoPE (rotate_half), grouped-query attention, SwiGLU, scanned layers, KV cache.

Causality is over cache slots, padding over a key mask and RoPE over per-row positions, so the same code runs a
full forward (slot = position in the sequence), left-padded batches, and cached decoding one token at a time.
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
    def __call__(self, x, positions, key_mask, cache, cache_index, deterministic):
        cfg = self.cfg
        b, t, _ = x.shape
        dense = lambda n, name, axes: Dense(n, axes, use_bias=False, lora=self.lora, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
        q = dense(cfg.num_heads * cfg.head_dim, "q_proj", ("embed", "heads"))(x, deterministic)
        k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", ("embed", "kv_heads"))(x, deterministic)
        v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", ("embed", "kv_heads"))(x, deterministic)
        q = rotary(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rotary(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        start = 0 if cache is None else cache_index
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            cache = {"k": k, "v": v}
        query_slot = start + jnp.arange(t)
        causal = query_slot[:, None] >= jnp.arange(k.shape[1])[None, :]
        mask = causal[None] & key_mask[:, None, :].astype(bool)
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
        dense = lambda n, name, axes: Dense(n, axes, use_bias=False, lora=self.lora, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
        gate = dense(self.cfg.mlp_dim, "gate_proj", ("embed", "mlp"))(x, deterministic)
        up = dense(self.cfg.mlp_dim, "up_proj", ("embed", "mlp"))(x, deterministic)
        return dense(self.cfg.width, "down_proj", ("mlp", "embed"))(nn.silu(gate) * up, deterministic)


class LlamaLayer(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cache, positions, key_mask, cache_index, deterministic):
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        norm = lambda name: RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        h, cache = LlamaAttention(self.cfg, self.lora, self.dtype, self.param_dtype, name="self_attn")(
            norm("input_layernorm")(x), positions, key_mask, cache, cache_index, deterministic)
        x = x + h
        x = x + LlamaMLP(self.cfg, self.lora, self.dtype, self.param_dtype, name="mlp")(
            norm("post_attention_layernorm")(x), deterministic)
        return x, cache


class Llama(nn.Module):
    """LlamaForCausalLM. Parameters: embed_tokens, layers (stacked), norm, lm_head (absent when tied)."""
    cfg: LlamaConfig
    lora: LoraConfig = LoraConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=logical(default_init, ("vocab", "embed")))
        stack = scan_layers(LlamaLayer, cfg.depth, self.remat_policy,
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            static_argnums=(6,))
        self.layers = stack(cfg, self.lora, self.dtype, self.param_dtype)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, lora=self.lora,
                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, embeds, positions, key_mask, cache=None, cache_index=None, deterministic=True):
        """embeds [B, T, W]; positions [B, T]; key_mask [B, S] (S = T, or the cache length when decoding);
        cache {'k','v': [layers, B, S, kv_heads, head_dim]} written at slot cache_index. -> (logits f32, cache)."""
        x, cache = self.layers(embeds.astype(self.dtype), cache, positions, key_mask, cache_index, deterministic)
        x = self.norm(x)
        if self.cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x, deterministic)
        return logits.astype(jnp.float32), cache


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32):
    """An empty KV cache of `length` slots for every layer."""
    shape = (cfg.depth, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
