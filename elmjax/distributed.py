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
