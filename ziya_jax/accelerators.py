"""Per-chip figures of the accelerators the project plans for and reports MFU against (vendor documentation; dense
bf16 matmul peaks): the TPU generations `compile` targets, and the GPUs `bench` runs on."""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, per chip."""

    libtpu_name: str  # the topology prefix libtpu knows
    accelerator: str  # Cloud TPU accelerator-type prefix
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float  # bytes/s
    cores_per_chip: int  # what the user-facing size counts per chip (v4-8 = 4 chips)
    torus_dims: int


TPUS = {
    "v4": Chip("v4", "v4", 32 * GiB, 275e12, 1.2e12, 2, 3),
    "v5e": Chip("v5e", "v5litepod", 16 * GiB, 197e12, 8.19e11, 1, 2),
    "v5p": Chip("v5p", "v5p", 95 * GiB, 459e12, 2.765e12, 2, 3),
    "v6e": Chip("v6e", "v6e", 32 * GiB, 918e12, 1.64e12, 1, 2),
}
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# Substrings of jax's device_kind -> TPU generation ("TPU v5 lite" is a v5e).
TPU_DEVICE_KINDS = (
    ("v6 lite", "v6e"),
    ("v6e", "v6e"),
    ("v5p", "v5p"),
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v4", "v4"),
)


def peak_flops_of(device_kind: str) -> float | None:
    """The dense bf16 peak of a device, by jax's device_kind; None for a device with no vendor figure (CPUs)."""
    kind = device_kind.lower()
    for key, generation in TPU_DEVICE_KINDS:
        if key in kind:
            return TPUS[generation].peak_flops
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key.lower() in kind), None)
