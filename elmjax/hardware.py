"""Peak dense matmul throughput per device, for MFU estimates.

Numbers are the vendors' dense (no sparsity) peaks. Unknown devices (CPUs
included) have no peak, and their MFU is reported as null rather than guessed.
"""

from __future__ import annotations

import jax

# device_kind substring -> (bf16 FLOP/s, fp32 FLOP/s)
_PEAKS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),  # SXM; PCIe parts are lower
    "A100": (312e12, 19.5e12),
    "L4": (121e12, 30e12),
    "TPU v6": (918e12, 918e12 / 2),
    "TPU v5p": (459e12, 459e12 / 2),
    "TPU v5 lite": (197e12, 197e12 / 2),
    "TPU v5e": (197e12, 197e12 / 2),
    "TPU v4": (275e12, 275e12 / 2),
}


def peak_flops(device=None, dtype: str = "bfloat16") -> float | None:
    return peak_flops_for_kind((device or jax.devices()[0]).device_kind, dtype)


def peak_flops_for_kind(kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak of a device kind (a substring match on ``device_kind``), None if unknown."""
    for name, (bf16, fp32) in _PEAKS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int, dtype: str) -> float | None:
    peak = peak_flops(dtype=dtype)
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak * num_devices)
