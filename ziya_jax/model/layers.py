"""The primitives every model part shares: one Dense (with logical axes and optional LoRA), norms, attention,
RoPE, and the scan/remat wrapper for layer stacks."""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from ziya_jax.config import LoraConfig

Dtype = Any
DEFAULT_INIT_STD = 0.02
default_init = nn.initializers.normal(DEFAULT_INIT_STD)


def logical(init: Callable, axes: tuple) -> Callable:
    """An initializer whose parameter carries logical axis names (mapped to mesh axes by the config's rules)."""
    return nn.with_logical_partitioning(init, axes)


def lora_applies(lora: LoraConfig, path: tuple[str, ...]) -> bool:
    """Targets name layers in a stack (.../layers/..., qformer/layer/...); an unrolled layer (layers_3, qformer's
    layer_3) matches as one of it."""
    path = re.sub(r"(^|/)(layers|qformer/layer)_\d+(?=/|$)", r"\1\2", "/".join(path))
    return lora.rank > 0 and any(re.fullmatch(t, path) for t in lora.targets)


@jax.custom_vjp
def matmul(x, w):
    """x [..., in] @ w [in, out] (one dtype) accumulated in float32 and returned in that dtype, and so are the
    products of its backward pass, which computes only the gradients asked for (none for a frozen weight).
    Autodiff's backward would multiply in the output dtype: XLA on CPU runs a bfloat16 product with a bfloat16
    result at half the speed of one with a float32 result (measured: 43 vs 22 ms at 1576x768x3072)."""
    if x.dtype != w.dtype:
        raise TypeError(f"matmul of {x.dtype} by {w.dtype}; cast both to the compute dtype")
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_fwd(x, w):  # x, w: CustomVJPPrimal (symbolic zeros); keep only what the wanted gradients read
    return matmul(x.value, w.value), (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _matmul_bwd(residuals, dy):
    x, w = residuals
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        return None, None
    product = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dy.dtype)
    return (
        None if w is None else product("...o,io->...i", dy, w),
        None if x is None else product("...i,...o->io", x, dy),
    )


matmul.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)


def int8_matmul(x, kernel, scale):
    """x [..., in] @ (kernel [in, out] int8 * scale [1, out]), a weight quantised by ziya_jax.quantize: qwix's
    product, float32 accumulation, returned in x's dtype. qwix dequantises a weight-only kernel and XLA runs a float
    dot on it: on one TPU chip the convert and scale fuse into the product, which reads the int8 kernel; XLA on the
    CPU writes a float32 copy of the kernel first (docs/quantization.md measures both)."""
    q = qwix.QArray(kernel, scale.astype(x.dtype))
    return qwix.einsum("...i,io->...o", x, q, preferred_element_type=jnp.float32).astype(x.dtype)


class Dense(nn.Module):
    """The one linear layer of ViT, Q-Former, projection and LLM.

    kernel [in, out] (the transpose of torch's weight); `axes` are its logical axis names. If the config's LoRA
    targets match this module's path, a low-rank update (lora_a [in, r], lora_b [r, out], B zero-initialised) is
    added: y = x W + b + (alpha / r) * dropout(x) A B. A kernel stored as int8 (ziya_jax.quantize, for decoding)
    has its per-output-channel scales beside it in kernel_scale [1, out] and is multiplied by int8_matmul.
    """

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    lora: LoraConfig = LoraConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel", logical(self.kernel_init, self.axes), (in_features, self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        if kernel.dtype == jnp.int8:
            scale = self.param(
                "kernel_scale", logical(nn.initializers.ones, (None, self.axes[1])), (1, self.features), jnp.float32
            )
            y = int8_matmul(x, kernel, scale)
        else:
            y = matmul(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if lora_applies(self.lora, self.scope.path):
            r = self.lora.rank
            a = self.param(
                "lora_a",
                logical(nn.initializers.normal(1.0 / r), (self.axes[0], None)),
                (in_features, r),
                self.param_dtype,
            )
            b = self.param(
                "lora_b", logical(nn.initializers.zeros, (None, self.axes[1])), (r, self.features), self.param_dtype
            )
            h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
            y = y + matmul(matmul(h, a.astype(self.dtype)) * (self.lora.alpha / r), b.astype(self.dtype))
        return y


def _lora_update(node, scale):
    return jnp.einsum("...ir,...ro->...io", node["lora_a"], node["lora_b"]) * scale


def merge_lora(params, lora: LoraConfig):
    """Fold every LoRA update into its base kernel and drop the adapters (what an export needs)."""
    scale = lora.alpha / max(lora.rank, 1)

    def visit(node):
        if not isinstance(node, dict):
            return node
        node = {k: visit(v) for k, v in node.items()}
        if "lora_a" in node:
            kernel = node["kernel"]
            node["kernel"] = (kernel + _lora_update(node, scale)).astype(kernel.dtype)
            del node["lora_a"], node["lora_b"]
        return node

    return visit(params)


def lora_adapters(params):
    """The LoRA leaves alone (nested dicts holding only lora_a/lora_b), to keep beside a merged copy."""

    def visit(node):
        if not isinstance(node, dict):
            return None
        if "lora_a" in node:
            return {"lora_a": node["lora_a"], "lora_b": node["lora_b"]}
        kept = {k: v for k, v in ((k, visit(v)) for k, v in node.items()) if v is not None}
        return kept or None

    return visit(params) or {}


def unmerge_lora(merged, adapters, lora: LoraConfig):
    """Inverse of merge_lora: subtract each adapter's update from its kernel and put the adapter back."""
    scale = lora.alpha / max(lora.rank, 1)

    def visit(node, ad):
        if "lora_a" in ad:
            kernel = node["kernel"]
            return {**node, **ad, "kernel": (kernel - _lora_update(ad, scale)).astype(kernel.dtype)}
        return {k: visit(v, ad[k]) if k in ad else v for k, v in node.items()}

    return visit(merged, adapters)


class LayerNorm(nn.Module):
    """LayerNorm with torch's two-pass variance (so converted models match), statistics in float32."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", logical(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalise in float32, cast back, then scale (the HF order of operations)."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", logical(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def attention(q, k, v, mask=None, dropout_rng=None, dropout_rate: float = 0.0):
    """Softmax attention with grouped-query support.

    q [B, T, H, D]; k, v [B, S, K, D] with H a multiple of K; mask bool, broadcastable to [B, T, S], True where a
    query may attend. Logits and softmax in float32; a fully masked row gives zeros, not NaN.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * d**-0.5
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)
    if dropout_rng is not None and dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, d)


def rotary(x, positions, theta: float):
    """RoPE in the HF rotate_half layout: x [B, T, H, D], positions [B, T] (ints)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def unroll_layers(params, key: str = "layers"):
    """params with the stack under `key` split into {key}_0 ... {key}_{depth-1}, the parameters of a stack's
    unrolled form (a module per layer). A copy of the layer weights: make it once per loaded model."""
    layers = params[key]
    depth = jax.tree_util.tree_leaves(layers)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != key}
    return {**rest, **{f"{key}_{i}": jax.tree_util.tree_map(lambda a: a[i], layers) for i in range(depth)}}


def scan_layers(block: type[nn.Module], length: int, remat_policy: str, unroll: int, in_axes: tuple, static_argnums=()):
    """A layer stack as one scanned module: parameters gain a leading 'layers' axis, compile time stays flat
    (`unroll` layers per loop iteration).

    The block is called as block(carry, *args) -> (carry, per_layer_output); `in_axes` gives, for each of
    args, 0 (scanned, e.g. a per-layer KV cache) or nn.broadcast.
    """
    if remat_policy != "none":
        block = nn.remat(block, policy=_REMAT[remat_policy], prevent_cse=False, static_argnums=static_argnums)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=length,
        unroll=True if unroll >= length else unroll,  # True: no loop
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
