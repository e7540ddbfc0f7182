"""Accelerator specs and a roofline estimate of one train step's time.

The estimate is ``max(compute, memory, communication)`` per device:

* compute = XLA's FLOPs for one device (``cost_analysis()['flops']``, which
  includes remat recomputation) / peak dense FLOP/s for the compute dtype;
* memory = bytes one device moves to and from HBM / HBM bandwidth: XLA's
  ``bytes accessed`` when the program was compiled for the accelerator
  itself; under ``--devices N`` (compiled by the CPU compiler, whose fusion
  is not the GPU/TPU compiler's and whose ``bytes accessed`` is several times
  an accelerator's) the lower bound of reading the step's arguments and
  writing its outputs once (the train state in and out), so the estimate
  stays a ceiling. The report says which (``memory_basis``);
* communication = ring-algorithm bytes each device sends for every collective
  in the optimized HLO (``elmjax.hlo_stats.wire_bytes``) / interconnect
  bandwidth.

Assumptions (so read the result as a ceiling, not a forecast):

* the three overlap perfectly (the max, not the sum), there are no kernel
  launch or latency costs, and every collective runs at the full one-way
  interconnect bandwidth of a device: NVLink inside one GPU node, ICI inside
  one TPU slice. GPU meshes spanning several nodes (InfiniBand, tens of GB/s
  per GPU) and multi-slice DCN traffic are slower than this;
* collectives inside a loop body (a ``grad_accum`` scan) are counted once;
* under ``--devices N`` FLOPs and collectives come from the CPU compiler's
  program; GSPMD partitions it as it would for the accelerator, so they carry
  over (latency-hiding and async scheduling differ, which the max ignores).

The MFU ceiling is the analytic model FLOPs of a step
(``elmjax.layout.train_flops_per_token``, no remat recomputation) over
devices x peak x estimated step time, the definition ``elmjax.hardware.mfu``
uses for measured runs.

Sources (dense, no sparsity; per chip):

* H100 SXM5: 989 TFLOP/s bf16, 67 TFLOP/s fp32, 80 GB HBM3 at 3.35 TB/s,
  NVLink 4 900 GB/s bidirectional (450 GB/s each way). NVIDIA H100 datasheet.
* H200 SXM: the H100's compute and NVLink, 141 GB HBM3e at 4.8 TB/s. NVIDIA
  H200 datasheet.
* A100 SXM4 80GB: 312 TFLOP/s bf16, 19.5 TFLOP/s fp32, 2.04 TB/s HBM2e,
  NVLink 3 600 GB/s bidirectional (300 GB/s each way). NVIDIA A100 datasheet.
* TPU v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s
  bidirectional. cloud.google.com/tpu/docs/v5e.
* TPU v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 1200 GB/s
  bidirectional. cloud.google.com/tpu/docs/v5p.
* TPU v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s (cloud.google.com/tpu/docs/v4);
  ICI 6 links x 45 GB/s each way ("How to Scale Your Model", Austin et al. 2025).
* FLOP/s peaks are ``elmjax.hardware``'s table (the one measured MFU uses).
  TPUs have no fp32 matmul peak of their own: fp32 matmuls run as several
  bf16 passes; that table uses half the bf16 peak.
* cpu: no published peak, so no time estimate; its memory is the host's RAM
  shared by the fake devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from elmjax.hardware import peak_flops_for_kind

GIB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    kind: str  # a JAX device_kind: the FLOP/s peaks come from elmjax.hardware's table
    hbm_bytes: float  # device memory
    hbm_bw: float | None  # bytes/s
    link_bw: float | None  # bytes/s one way, per device

    def peak(self, dtype: str) -> float | None:
        return peak_flops_for_kind(self.kind, dtype) if self.kind else None


def _host_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


ACCELERATORS = {
    "h100": Accelerator("h100", "H100", 80 * GIB, 3.35e12, 450e9),
    "h200": Accelerator("h200", "H200", 141e9, 4.8e12, 450e9),
    "a100": Accelerator("a100", "A100", 80 * GIB, 2.039e12, 300e9),
    "v5e": Accelerator("v5e", "TPU v5e", 16 * GIB, 819e9, 200e9),
    "v5p": Accelerator("v5p", "TPU v5p", 95 * GIB, 2765e9, 600e9),
    "v4": Accelerator("v4", "TPU v4", 32 * GIB, 1200e9, 270e9),
}

# device_kind substring -> accelerator name, for the default --accelerator
_KINDS = {"H100": "h100", "H200": "h200", "A100": "a100", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
          "TPU v5p": "v5p", "TPU v5": "v5p", "TPU v4": "v4"}


def accelerator(name: str, num_devices: int = 1) -> Accelerator:
    if name == "cpu":
        return Accelerator("cpu", "", _host_memory() / max(num_devices, 1), None, None)
    return ACCELERATORS[name]


def detect(device_kind: str) -> str:
    """The accelerator name for a JAX ``device_kind`` ('cpu' when unknown)."""
    for kind, name in _KINDS.items():
        if kind.lower() in device_kind.lower():
            return name
    return "cpu"


@dataclass(frozen=True)
class Estimate:
    compute_s: float
    memory_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.comm_s)

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.memory_s, "memory"), (self.comm_s, "communication"))[1]


def estimate(acc: Accelerator, dtype: str, device_flops: float, device_bytes: float,
             device_wire_bytes: float) -> Estimate | None:
    """Roofline step time of one device's share; None without published peaks."""
    peak = acc.peak(dtype)
    if peak is None or acc.hbm_bw is None or acc.link_bw is None:
        return None
    return Estimate(device_flops / peak, device_bytes / acc.hbm_bw, device_wire_bytes / acc.link_bw)


def mfu_ceiling(acc: Accelerator, dtype: str, model_flops_per_step: float, num_devices: int,
                est: Estimate | None) -> float | None:
    peak = acc.peak(dtype)
    if est is None or peak is None or est.step_s <= 0:
        return None
    return model_flops_per_step / (num_devices * peak * est.step_s)
