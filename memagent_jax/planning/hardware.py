"""Units and the hardware table: one device's HBM, dense bf16 peak FLOP/s and HBM bandwidth per accelerator kind,
looked up by name or alias."""

from __future__ import annotations

import dataclasses

from memagent_jax.planning.errors import PlanError

GiB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator as JAX sees it (one device): HBM bytes, dense bf16 peak FLOP/s, HBM bandwidth (bytes/s)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    description: str


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("tpu-v4", 32 * GiB, 275e12, 1.2e12, "Cloud TPU v4 chip (one megacore device)"),
        Hardware("tpu-v5e", 16 * GiB, 197e12, 0.819e12, "Cloud TPU v5e chip"),
        Hardware("tpu-v5p", 95 * GiB, 459e12, 2.765e12, "Cloud TPU v5p chip (one megacore device)"),
        Hardware("tpu-v6e", 32 * GiB, 918e12, 1.64e12, "Cloud TPU v6e (Trillium) chip"),
        Hardware("h100-80gb", 81559 * 1024**2, 989e12, 3.35e12, "NVIDIA H100 SXM 80GB"),
        Hardware("h200", 143771 * 1024**2, 989e12, 4.8e12, "NVIDIA H200 SXM 141GB"),
        Hardware("a100-80gb", 81920 * 1024**2, 312e12, 2.039e12, "NVIDIA A100 SXM 80GB"),
    )
}

_ALIASES = {
    "v4": "tpu-v4",
    "v5e": "tpu-v5e",
    "v5litepod": "tpu-v5e",
    "v5p": "tpu-v5p",
    "v6e": "tpu-v6e",
    "trillium": "tpu-v6e",
    "h100": "h100-80gb",
    "h200-141gb": "h200",
    "a100": "a100-80gb",
}


def get_hardware(name: str) -> Hardware:
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in HARDWARE:
        raise PlanError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[key]


def platform_of(hw: Hardware) -> str:
    """'tpu' for the TPU entries of HARDWARE, 'gpu' (CUDA) for the others."""
    return "tpu" if hw.name.startswith("tpu") else "gpu"
