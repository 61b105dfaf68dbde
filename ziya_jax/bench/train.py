"""Stage-3 train step of ziya_jax vs a PyTorch reference doing the same step, in one run, plus MFU.

Model: the decode benchmark's (ViT-B/16-like at 224, 6-layer 768 Q-Former with 32 queries, 12-layer 768 LLaMA,
vocab 32000), Base layout, random weights converted from one transformers Blip2 model, so both sides start from
the same numbers. The step: LoRA rank 8 (alpha 16, no dropout) on the ViT's qkv/projection and the LLM's
q/k/v/o projections; the Q-Former, query tokens, projection and LoRA factors train; AdamW with clipping; LM loss
on the answer tokens; batch 8 of one image and 32 text tokens each. The PyTorch side wraps the same linears in a
LoRA module, freezes the rest, and runs forward + backward + clip + AdamW (eager, on the GPU when JAX runs on one,
else on all CPU threads).
--dtype bfloat16 computes both sides in bfloat16 with float32 weights and optimizer (ziya_jax: model.dtype; PyTorch:
autocast); the default is float32 on both. --frozen-dtype bfloat16 also stores what does not train in bfloat16 on
both sides.
Step time: --steps steps dispatched back to back (as ziya_jax's loop and a PyTorch loop that does not read each
loss run them), waited for once, divided by --steps.
MFU = the step's matmul FLOPs (counted from the traced program, remat included) / step time / a square matmul's
FLOP/s in the compute dtype, measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ziya_jax.bench.decode import hf_model
from ziya_jax.bench.trace import device_time, print_device_time, trace_events
from ziya_jax.config import LoraConfig
from ziya_jax.convert import load_hf
from ziya_jax.model import init_params
from ziya_jax.train.observe import matmul_flops, measure_matmul_flops
from ziya_jax.train.optimizer import default_optimizer, logged_lr, make_optimizer
from ziya_jax.train.step import Stage, init_state, train_step
from ziya_jax.tree import flatten, unflatten

RANK, TEXT_LEN, ANSWER_LEN = 8, 32, 8
LORA_TARGETS = (
    r"vision_model/layers/self_attn/(qkv|projection)",
    r"language_model/layers/self_attn/(q_proj|k_proj|v_proj|o_proj)",
)
TORCH_LORA = re.compile(r".*(vision_model\..*self_attn\.(qkv|projection)|language_model\..*self_attn\.[qkvo]_proj)$")
TRAINABLE = ("qformer", "query_tokens", "language_projection", r".*/lora_[ab]")
TORCH_TRAINABLE = re.compile(r"^(qformer\.|query_tokens|language_projection\.)|\.lora_[ab]$")
OPTIMIZER = dict(lr=1e-5, warmup_init_lr=1e-5, warmup_steps=0, total_steps=1000, end_lr=1e-5)


def batch_arrays(cfg, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    q = cfg.num_query_tokens
    ids = np.concatenate(
        [np.full((batch, q), cfg.image_token_id), rng.integers(3, cfg.image_token_id, (batch, TEXT_LEN))], 1
    )
    loss_mask = np.zeros_like(ids)
    loss_mask[:, -ANSWER_LEN:] = 1
    size = cfg.vision.image_size
    return dict(
        input_ids=ids.astype(np.int32),
        attention_mask=np.ones_like(ids, np.int32),
        loss_mask=loss_mask.astype(np.int32),
        pixel_values=rng.normal(size=(batch, 1, size, size, 3)).astype(np.float32),
    )


def jax_step(params, cfg, batch: dict, args):
    """-> (seconds per step, FLOPs per step, first loss, device-time summary of args.steps more steps traced into
    args.profile, or None)."""
    cfg = dataclasses.replace(
        cfg,
        dtype=args.dtype,
        scan_unroll=args.scan_unroll,
        lora=LoraConfig(rank=RANK, alpha=2.0 * RANK, dropout=0.0, targets=LORA_TARGETS),
    )
    fresh = flatten(init_params(cfg, jax.random.key(0)))  # the LoRA factors (B = 0); the rest comes from HF
    params = unflatten({**fresh, **flatten(params)})
    opt = default_optimizer(**OPTIMIZER)
    stage, tx = Stage(TRAINABLE, (("lm", 1.0),), frozen_dtype=args.frozen_dtype), make_optimizer(opt)
    state = jax.jit(lambda p: init_state(p, stage, tx, jax.random.key(1)))(params)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jax.jit(lambda s, b: train_step(s, b, cfg, stage, tx, logged_lr(opt)), donate_argnums=0)
    traced = step.trace(state, batch)
    compiled, flops = traced.lower().compile(), matmul_flops(traced.jaxpr.jaxpr)

    def run_steps(n: int) -> dict:
        """n steps back to back, as a training loop dispatches them; waits for the last -> its metrics."""
        nonlocal state
        for _ in range(n):
            state, metrics = compiled(state, batch)
        return jax.block_until_ready(metrics)

    first = float(run_steps(1)["loss"])  # warm-up
    start = time.perf_counter()
    run_steps(args.steps)
    seconds = (time.perf_counter() - start) / args.steps
    summary = (
        device_time(trace_events(lambda: run_steps(args.steps), args.profile), args.steps) if args.profile else None
    )
    return seconds, flops, first, summary


def torch_step(model, batch: dict, args, device: str):
    """The same step in PyTorch -> (seconds per step, first loss)."""
    import torch

    add_torch_lora(model)
    model.to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(TORCH_TRAINABLE.search(name)))
        if args.frozen_dtype and not p.requires_grad:
            p.data = p.data.to(getattr(torch, args.frozen_dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = default_optimizer(**OPTIMIZER)
    adamw = torch.optim.AdamW(
        trainable, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=opt.weight_decay, fused=device == "cuda"
    )
    model.train()
    ids, mask, loss_mask = (
        torch.from_numpy(batch[k]).long().to(device) for k in ("input_ids", "attention_mask", "loss_mask")
    )
    pixels = torch.from_numpy(batch["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy()).to(device)

    def one_step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        )
        weights = loss_mask[:, 1:].flatten().float()
        loss = (losses * weights).sum() / weights.sum()
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, opt.grad_clip)
        adamw.step()
        return loss.detach()

    first = one_step().item()  # warm-up; .item() waits for the whole step on a GPU too
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = one_step()
    loss.item()
    return (time.perf_counter() - start) / args.steps, first


def add_torch_lora(model) -> None:
    import torch

    class LoRALinear(torch.nn.Module):
        """y = base(x) + (alpha / r) * x A^T B^T, B starting at zero (the same function as ziya_jax's Dense)."""

        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Parameter(torch.randn(RANK, base.in_features) / base.in_features**0.5)
            self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, RANK))

        def forward(self, x):
            return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * 2.0

    targets = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and TORCH_LORA.match(name)]
    if not targets:
        raise RuntimeError("no LoRA targets found in the transformers model; module names changed?")
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child)))


def run(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    model = hf_model(args.small)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        params, cfg = load_hf(tmp)
    batch = batch_arrays(cfg, args.batch)
    peak = measure_matmul_flops(dtype=jnp.dtype(args.dtype))
    ours_s, flops, ours_loss, profile = jax_step(params, cfg, batch, args)
    del params
    theirs_s, theirs_loss = torch_step(model, batch, args, torch_device)
    mfu = flops / ours_s / peak
    if profile is not None:
        print_device_time(profile, ours_s)
    print(f"first-step loss: ziya_jax {ours_loss:.5f}, PyTorch {theirs_loss:.5f} (same weights, LoRA B = 0)")
    print(f"step time: ziya_jax {ours_s * 1e3:.0f} ms, PyTorch {theirs_s * 1e3:.0f} ms -> {theirs_s / ours_s:.2f}x")
    print(
        f"matmul FLOPs/step {flops / 1e9:.1f} G; measured {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s -> "
        f"MFU {mfu:.1%}"
    )
    # Both sides do the same products, so PyTorch's step at the same FLOPs gives its MFU, and the step at the
    # measured peak bounds the speed-up any implementation could show here.
    pytorch_mfu, ceiling = flops / theirs_s / peak, theirs_s / (flops / peak)
    print(f"PyTorch's MFU on the same FLOPs {pytorch_mfu:.1%}; at 100% of the peak ziya_jax would be {ceiling:.2f}x")
    result = dict(
        batch=args.batch,
        lora_rank=RANK,
        dtype=args.dtype,
        frozen_dtype=args.frozen_dtype,
        scan_unroll=args.scan_unroll,
        ziya_jax_step_s=ours_s,
        pytorch_step_s=theirs_s,
        speedup=theirs_s / ours_s,
        flops_per_step=flops,
        peak_flops=peak,
        mfu=mfu,
        pytorch_mfu=pytorch_mfu,
        ceiling_speedup=ceiling,
        first_loss_ziya_jax=ours_loss,
        first_loss_pytorch=theirs_loss,
        device=jax.devices()[0].device_kind,
        pytorch_device=torch_device,
    )
    print(json.dumps(result))
    return result
