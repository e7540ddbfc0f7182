"""Multi-host start-up: call ``jax.distributed.initialize`` when the environment says so.

Every process runs the same program. Detected, in order:

* explicit flags or ``ELMJAX_COORDINATOR`` / ``ELMJAX_NUM_PROCESSES`` /
  ``ELMJAX_PROCESS_ID`` (any cluster, or several local processes);
* SLURM with more than one task (``SLURM_NTASKS`` > 1): JAX reads the rest;
* multi-host Cloud TPU slices (``TPU_WORKER_HOSTNAMES`` lists several hosts,
  or ``MEGASCALE_COORDINATOR_ADDRESS`` is set): JAX reads the rest.

On CPU the collectives go through gloo so CPU-only processes can train
together (used by the tests).
"""

from __future__ import annotations

import logging
import os

import jax

from elmjax.errors import UserError

log = logging.getLogger(__name__)
_initialized = False


def _wants_auto() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialise jax.distributed once if flags or the environment ask for it."""
    global _initialized
    if _initialized:
        return True
    coordinator = coordinator or os.environ.get("ELMJAX_COORDINATOR")
    if num_processes is None and "ELMJAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["ELMJAX_NUM_PROCESSES"])
    if process_id is None and "ELMJAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["ELMJAX_PROCESS_ID"])
    if coordinator is None and not _wants_auto():
        return False
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise UserError("--coordinator needs --num-processes and --process-id too")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    _initialized = True
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


class StopAgreement:
    """A stop request every process acts on at the same step.

    Each process sees its own SIGTERM at its own time; if each saved when it
    saw it, one process would enter the collective save while the others run
    the collective train step, and all would hang. So every step each process
    contributes its local flag to a tiny all-reduce, and all stop when the
    result says so. The result of step n is read at step n+1, after step
    n+1 is dispatched, so the loop never waits on it; every process reads the
    same value at the same step. One process: the local flag, no collective."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._pending = None
        if self.multi:
            import numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

            mesh = Mesh(np.array(jax.devices()), ("p",))
            self._sharding = NamedSharding(mesh, P("p"))
            self._any = jax.jit(lambda f: f.max(), out_shardings=NamedSharding(mesh, P()))
            self._local = np.zeros((jax.local_device_count(),), np.int32)

    def __call__(self, local: bool) -> bool:
        """Called once per step by every process: True when all must stop now."""
        if not self.multi:
            return local
        self._local[:] = int(local)
        flag = self._any(jax.make_array_from_process_local_data(self._sharding, self._local))
        previous, self._pending = self._pending, flag
        return previous is not None and bool(previous)
