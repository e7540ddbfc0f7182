"""Peak dense matmul throughput per device, for MFU estimates.

Accelerators use the vendors' dense (no sparsity) peaks. CPUs have no
published peak that means anything for XLA, so their peak is measured once:
the best of a few 1024- and 2048-square matmuls, cached on disk per device
kind, device count, dtype and jax version (``~/.cache/elmjax/peak.json``).
The measurement takes a few seconds and is only as good as the machine was
quiet then: delete the file to measure again.
Other unknown devices have no peak, and their MFU is reported as null.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.config_io import atomic_write_text

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
    """Published peak of the device, or on CPU this machine's measured one."""
    device = device or jax.devices()[0]
    peak = peak_flops_for_kind(device.device_kind, dtype)
    if peak is None and device.platform == "cpu":
        return measured_peak(dtype)
    return peak


def peak_flops_for_kind(kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak of a device kind (a substring match on ``device_kind``), None if unknown."""
    for name, (bf16, fp32) in _PEAKS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "elmjax" / "peak.json"


def measured_peak(dtype: str = "float32") -> float:
    """This machine's dense matmul FLOP/s on the default device, measured once and cached."""
    # The host name too: CPU device kinds are generic, and home directories are shared.
    key = f"{platform.node()}|{jax.devices()[0].device_kind}|{jax.device_count()}|{dtype}|jax {jax.__version__}"
    path = _cache_path()
    if (path, key) in _MEASURED:  # training asks at every log step
        return _MEASURED[path, key]
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict) or not isinstance(cache.get(key), (int, float)):
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = _measure(dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True))
    _MEASURED[path, key] = float(cache[key])
    return _MEASURED[path, key]


_MEASURED: dict[tuple[Path, str], float] = {}


def _measure(dtype: str, sizes=(1024, 2048), repeats: int = 3) -> float:
    """Best FLOP/s over a few square matmuls of arguments (not constants, which XLA would fold)."""
    best = 0.0
    matmul = jax.jit(jnp.matmul)
    for n in sizes:
        rng = np.random.default_rng(0)
        a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32), dtype) for _ in range(2))
        jax.block_until_ready(matmul(a, b))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(matmul(a, b))
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int, dtype: str) -> float | None:
    device = jax.devices()[0]
    peak = peak_flops(device, dtype=dtype)
    if peak is None or tokens_per_s <= 0:
        return None
    # CPU "devices" (--xla_force_host_platform_device_count) share one
    # machine, whose whole peak the measurement already is.
    devices = 1 if device.platform == "cpu" else num_devices
    return flops_per_token * tokens_per_s / (peak * devices)
