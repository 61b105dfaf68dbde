"""int8 weight-only quantisation for decoding: `params, cfg = quantize(params, cfg, "int8")`.

Every linear layer of the ViT and the LLM (each Dense kernel under vision_model and language_model, the LM head
included) becomes int8 with one float32 scale per output channel, symmetric (w ~ q * scale, no zero point),
computed by qwix. Dense multiplies by such a kernel through ziya_jax.model.layers.int8_matmul, so decode.generate,
the evaluation Generator and a full forward run it unchanged. A decoding step reads every LLM weight once per token;
int8 stores a quarter of float32's bytes, half of bfloat16's, and where XLA fuses the dequantisation into the
product (one TPU chip) the step reads that much less (docs/quantization.md: TPU memory, and what the CPU does). The
Q-Former, the projection, embeddings, norms and biases keep their dtype (a few percent of the weights, and the
embeddings are looked up, not multiplied).

LoRA adapters are merged into their kernels first, so the int8 kernel holds W + (alpha / r) A B and the returned
config has no LoRA. Works on stacked and on decode_params' per-layer weights alike (either order; quantising first
makes decode_params copy int8), and on abstract parameters under jax.eval_shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import qwix

from ziya_jax.config import LoraConfig, ModelConfig
from ziya_jax.model.layers import _lora_update

MODES = ("", "none", "int8")
QUANTIZED_PARTS = ("vision_model", "language_model")


def quantize(params, cfg: ModelConfig, mode: str):
    """-> (params, cfg) for `mode`: '' or 'none' returns them unchanged; 'int8' as the module says. A new tree;
    each kernel is converted alone (one jitted call per tensor), so the peak is the input plus its int8 copy."""
    if mode not in MODES:
        raise ValueError(f"quantize mode {mode!r}; choose one of {', '.join(repr(m) for m in MODES)}")
    if mode in ("", "none"):
        return params, cfg
    lora_scale = cfg.lora.alpha / max(cfg.lora.rank, 1)

    def visit(node, part):
        if not isinstance(node, dict):
            return node
        node = {k: visit(v, part) for k, v in node.items()}
        if "lora_a" in node:
            node["kernel"] = _merged(node.pop("kernel"), node.pop("lora_a"), node.pop("lora_b"), lora_scale)
        kernel = node.get("kernel")
        if part in QUANTIZED_PARTS and kernel is not None and jnp.issubdtype(kernel.dtype, jnp.floating):
            node["kernel"], node["kernel_scale"] = _int8(kernel)
        return node

    return {k: visit(v, k) for k, v in params.items()}, dataclasses.replace(cfg, lora=LoraConfig())


def quantize_abstract(params, cfg: ModelConfig, mode: str):
    """quantize on abstract parameters (ShapeDtypeStructs): -> (their quantised shapes and dtypes, cfg)."""
    out = {}

    def run(p):
        quantized, out["cfg"] = quantize(p, cfg, mode)
        return quantized

    return jax.eval_shape(run, params), out["cfg"]


@functools.partial(jax.jit, static_argnums=3)
def _merged(kernel, lora_a, lora_b, scale: float):
    return (kernel + _lora_update({"lora_a": lora_a, "lora_b": lora_b}, scale)).astype(kernel.dtype)


@jax.jit
def _int8(kernel):
    """kernel [..., in, out] (a leading layer axis when stacked) -> (int8 [..., in, out], float32 [..., 1, out]):
    one scale per output channel of each layer, max |w| over the input axis / 127.5 (qwix's symmetric int8)."""
    axes = [a for a in range(kernel.ndim) if a != kernel.ndim - 2]
    q = qwix.quantize(kernel.astype(jnp.float32), jnp.int8, channelwise_axes=axes)
    return q.qvalue, q.scale


def shardings(float_shardings, quantized):
    """The shardings of quantize's output `quantized` (abstract is enough) from those of its input (NamedSharding
    leaves): kernels keep theirs, a kernel_scale takes its kernel's without the input axis (of size 1 there)."""

    def visit(sharding, node):
        if not isinstance(node, dict):
            return sharding
        out = {k: visit(sharding[k], v) for k, v in node.items() if k != "kernel_scale"}
        if "kernel_scale" in node:
            kernel = sharding["kernel"]
            spec = list(kernel.spec) + [None] * (node["kernel"].ndim - len(kernel.spec))
            spec[-2] = None
            out["kernel_scale"] = jax.sharding.NamedSharding(kernel.mesh, jax.sharding.PartitionSpec(*spec))
        return out

    return visit(float_shardings, quantized)
