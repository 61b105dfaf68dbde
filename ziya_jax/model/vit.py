"""EVA ViT as BLIP-2 uses it: patch embedding, CLS, absolute positions, pre-LN blocks, no final norm inside,
then the separate ln_vision (HF `post_layernorm`).

The qkv bias is one parameter [3W] as transformers stores it (initialised with a zero k slot as in LAVIS);
keeping the k slot makes HF round trips lossless since that slot is trainable there.
"""

from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from ziya_jax.config import LoraConfig, VisionConfig
from ziya_jax.model.layers import Dense, LayerNorm, attention, default_init, logical, scan_layers


class VisionAttention(nn.Module):
    cfg: VisionConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        b, t, w = x.shape
        qkv = Dense(
            3 * w, ("embed", "heads"), lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv"
        )(x, deterministic)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, cfg.num_heads, w // cfg.num_heads), 3, axis=2)
        out = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        return Dense(
            w, ("heads", "embed"), lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, name="projection"
        )(out.reshape(b, t, w), deterministic)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, deterministic):
        dense = lambda n, name, axes: Dense(
            n, axes, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = nn.gelu(dense(self.cfg.mlp_dim, "fc1", ("embed", "mlp"))(x, deterministic), approximate=False)
        return dense(self.cfg.width, "fc2", ("mlp", "embed"))(h, deterministic)


class VisionLayer(nn.Module):
    cfg: VisionConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name=name)
        x = x + VisionAttention(cfg, self.lora, self.dtype, self.param_dtype, name="self_attn")(
            norm("layer_norm1")(x), deterministic
        )
        h = VisionMLP(cfg, self.lora, self.dtype, self.param_dtype, name="mlp")(norm("layer_norm2")(x), deterministic)
        return x + h, None


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixels, deterministic):
        """pixels [B, H, W, 3] normalised -> [B, 1 + patches, width]."""
        cfg = self.cfg
        p = cfg.patch_size
        patches = einops.rearrange(pixels, "b (h p1) (w p2) c -> b h w (p1 p2 c)", p1=p, p2=p)
        grid = patches.shape[1:3]
        # A patchify followed by the shared Dense is the stride-p convolution; its kernel is the conv
        # kernel [p, p, 3, W] flattened.
        x = Dense(
            cfg.width,
            ("patch", "embed"),
            lora=self.lora,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embedding",
        )(patches, deterministic)
        x = x.reshape(x.shape[0], -1, cfg.width)
        cls = self.param(
            "class_embedding", logical(default_init, (None, None, "embed")), (1, 1, cfg.width), self.param_dtype
        )
        n = (cfg.image_size // p) ** 2
        pos = self.param(
            "position_embedding", logical(default_init, (None, None, "embed")), (1, n + 1, cfg.width), self.param_dtype
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, cfg.width)), x], axis=1)
        return x + interpolate_positions(pos, grid).astype(self.dtype)


def interpolate_positions(pos, grid: tuple[int, int]):
    """Bicubic resize of the patch position grid for images of another size (the CLS position is kept).

    Note: jax.image's bicubic kernel (Keys, a=-0.5) differs slightly from torch's (a=-0.75), so resized
    positions are close to, not equal to, transformers' interpolate_pos_encoding.
    """
    n = pos.shape[1] - 1
    side = int(round(n**0.5))
    if (side, side) == tuple(grid):
        return pos
    patch_pos = pos[:, 1:].reshape(1, side, side, -1)
    patch_pos = jax.image.resize(patch_pos, (1, *grid, pos.shape[-1]), method="bicubic", antialias=False)
    return jnp.concatenate([pos[:, :1], patch_pos.reshape(1, grid[0] * grid[1], -1)], axis=1)


class VisionTransformer(nn.Module):
    """Returns ln_vision(ViT(pixels)): [B, 1 + patches, width], the Q-Former's cross-attention input.
    unrolled: one module per layer (parameters layers_0 ... , see layers.unroll_layers), for decoding."""

    cfg: VisionConfig
    lora: LoraConfig = LoraConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_unroll: int = 1
    unrolled: bool = False

    @nn.compact
    def __call__(self, pixels, deterministic: bool = True):
        x = VisionEmbeddings(self.cfg, self.lora, self.dtype, self.param_dtype, name="embeddings")(
            pixels, deterministic
        )
        args = (self.cfg, self.lora, self.dtype, self.param_dtype)
        if self.unrolled:
            for i in range(self.cfg.depth):
                x, _ = VisionLayer(*args, name=f"layers_{i}")(x, deterministic)
        else:
            stack = scan_layers(
                VisionLayer,
                self.cfg.depth,
                self.remat_policy,
                self.scan_unroll,
                in_axes=(nn.broadcast,),
                static_argnums=(2,),
            )
            x, _ = stack(*args, name="layers")(x, deterministic)
        return LayerNorm(self.cfg.layer_norm_eps, self.dtype, self.param_dtype, name="post_layernorm")(x)
