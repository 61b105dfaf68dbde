"""What a run shows while it trains: a progress bar, TensorBoard event files and metrics.jsonl in the workdir,
and the FLOP figures behind the MFU estimate (counted from the traced program: XLA's cost analysis counts a
scanned layer stack's body once)."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params
from tqdm.auto import tqdm

from ziya_jax.accelerators import peak_flops_of
from ziya_jax.model.layers import matmul

METRICS_FILE = "metrics.jsonl"


def measure_matmul_flops(n: int | None = None, dtype=jnp.float32, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul (the model's: float32 accumulation) of random data on the default device: the
    peak an MFU is measured against where no vendor figure applies (CPUs), and in the benchmarks. An accelerator
    gets an 8192 square, queued 10 at a time, so that neither launch latency nor a small product's tail counts."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    square = jax.jit(lambda x: matmul(x, x))
    square(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            out = square(a)
        out.block_until_ready()
        runs += 10
    return 2 * n**3 * runs / (time.perf_counter() - start)


def peak_flops(device=None) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for one device."""
    device = device or jax.devices()[0]
    flops = peak_flops_of(device.device_kind)
    if flops:
        return flops, f"{device.device_kind} bf16 peak"
    return measure_matmul_flops(), f"measured f32 matmul on {device.device_kind}"


def matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products and convolutions of a jaxpr, scan bodies counted once per iteration (XLA's
    own cost analysis counts a loop body once, so it undercounts scanned layers); remat recomputation is part of
    the differentiated jaxpr and counted too. The larger branch of a cond counts."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # the kernel: out features x (in features / groups) x window
            total += (
                2.0
                * math.prod(eqn.outvars[0].aval.shape)
                * math.prod(rhs)
                / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            )
        subs = [matmul_flops(j) for j in jaxprs_in_params(eqn.params)]
        if name == "cond":
            total += max(subs, default=0.0)
        else:
            total += (eqn.params["length"] if name == "scan" else 1) * sum(subs)
    return total


class Reporter:
    """Per-step metrics to the progress bar (every `log_every` steps), TensorBoard and metrics.jsonl (every
    step, one line per step: a resumed run first drops the lines past the step it restored). In a multi-host
    job only process 0 shows and writes anything (the metrics are global; the workdir may be shared)."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, log_every: int, desc: str):
        from tensorboardX import SummaryWriter

        self.lead = jax.process_index() == 0
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, smoothing=0.1, disable=not self.lead
        )
        self.log_every = log_every
        if self.lead:
            os.makedirs(workdir, exist_ok=True)
            self.path = os.path.join(workdir, METRICS_FILE)
            _truncate_after(self.path, start_step)
            self.jsonl = open(self.path, "a", encoding="utf-8")
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(1)
        if not self.lead:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        if step % self.log_every == 0:
            self.bar.set_postfix_str(_short(metrics), refresh=False)

    def scalars(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if not self.lead:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.lead:
            self.writer.close()
            self.jsonl.close()


SHOWN = ("loss", "lm", "itc", "itm", "itg", "lr", "grad_norm", "examples_per_s", "tokens_per_s", "mfu")


def _short(metrics: dict[str, float]) -> str:
    names = {"examples_per_s": "ex/s", "tokens_per_s": "tok/s", "grad_norm": "gnorm"}
    parts = []
    for k in SHOWN:
        if k in metrics:
            v = metrics[k]
            text = f"{v:.1%}" if k == "mfu" else f"{v:.2e}" if k == "lr" else f"{v:.0f}" if v >= 100 else f"{v:.3f}"
            parts.append(f"{names.get(k, k)}={text}")
    return " ".join(parts)


def _truncate_after(path: str, step: int) -> None:
    """Drop the lines of steps > `step` (written by a run that died after its last checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_of(rows: list[dict], key: str, last: int) -> float:
    return float(np.mean([r[key] for r in rows[-last:] if key in r]))
