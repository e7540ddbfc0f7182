"""Keep the XLA CPU runtime's per-step scratch memory mapped between steps.

The CPU runtime mallocs each execution's temporaries in one block (the tiny
layer-wise train step: 138 MB) and frees it when the step ends. glibc serves
a block that large with a fresh ``mmap`` and returns it with ``munmap``, so
every step page-faults all of it back in: on the tiny model 34k minor faults
and about half of the step's wall time, spent in the kernel. Serving large
blocks from the main heap and never trimming it lets the next step reuse the
same pages (0 faults; 1.2-1.3x the tokens/s of the same step, in one process).

This is process-wide and must run before JAX starts its CPU client: XLA's
worker threads pick their malloc arena on first use, and only the main arena
can hold blocks above 64 MB without ``mmap``. Entry points (``elmjax.train``,
``elmjax.bench``) call it first thing. It does nothing off glibc, when a JAX
accelerator plugin or libtpu is installed (the host then only stages data),
or once a JAX backend exists. The cost: memory freed by the process stays
reserved by it, at most its peak heap size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import pkgutil
import sys

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _accelerator_installed() -> bool:
    """Whether JAX could start a GPU/TPU backend here (the same discovery JAX uses)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if list(importlib.metadata.entry_points(group="jax_plugins")):
        return True
    try:
        import jax_plugins  # namespace package of PJRT plugins, if any
    except ImportError:
        return False
    return any(pkgutil.iter_modules(jax_plugins.__path__))


def _backend_started() -> bool:
    # Look, don't import: a CLI that never needs JAX (sweeps.run --dry-run)
    # calls this first thing, and a backend cannot exist before jax is imported.
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bridge is not None and bridge.backends_are_initialized()


def keep_scratch_in_heap() -> bool:
    """Make large allocations come from the (never trimmed) main heap; True if applied."""
    if _accelerator_installed() or _backend_started():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt)
        return False
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    log.debug("keep_scratch_in_heap: mallopt %s", "applied" if ok else "refused")
    return bool(ok)
