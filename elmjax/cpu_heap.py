"""Keep the XLA CPU runtime's per-step scratch memory mapped between steps.

The CPU runtime mallocs each execution's temporaries in one block (the tiny
layer-wise train step: 138 MB) and frees it when the step ends. glibc serves
a block that large with a fresh ``mmap`` and returns it with ``munmap``, so
every step page-faults all of it back in: on the tiny model 34k minor faults
and about half of the step's wall time, spent in the kernel. Serving large
blocks from the main heap and never trimming it lets the next step reuse the
same pages (0 faults; 1.2-1.3x the tokens/s of the same step, in one process).

Only glibc's main arena can hold blocks above 64 MB without ``mmap`` (other
threads' arenas are 64 MB heaps and ``mmap`` anything larger, whatever
``M_MMAP_MAX`` says), and the main thread always allocates from it. So the
programs run on the thread that calls them (JAX's
``jax_cpu_enable_async_dispatch`` off: a single-device CPU program then runs
inline, its temporaries malloc'ed by the caller) rather than on a runtime
worker thread. Until 2026-12-01 this module forced every thread into the main
arena instead (``M_ARENA_MAX`` = 1); XLA compiles its kernels on several
threads, which then queued for that arena's lock (``python -m elmjax.bench``
on the tiny model, 2 cores: compile 4.8-4.9 s then, 3.3-3.5 s now, and
20.7-22.5k tokens/s then, 24.4-25.4k now; the README has the details).
Programs over several devices (fake CPU devices in tests) still run on
worker threads, whose scratch is ``mmap``ed as before.

This is process-wide and must run before JAX starts its CPU client: it does
nothing off glibc, when a JAX accelerator plugin or libtpu is installed (the
host then only stages data), or once a JAX backend exists. If ``jax`` is not
imported yet, the dispatch setting is made the moment it is (an import hook),
so a CLI that never trains does not pay for importing JAX. Entry points
(``elmjax.train``, ``elmjax.bench``, ``sweeps.run``) call it first thing.
The cost: memory freed by the process stays reserved by it, at most its
peak heap size, and a Python thread that waits for a step cannot do other
work meanwhile (the train loop has none: batches come from grain's workers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.abc
import importlib.metadata
import importlib.util
import logging
import pkgutil
import sys

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_INLINE_FLAG = "jax_cpu_enable_async_dispatch"


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
    """Make large blocks come from the (never trimmed) main heap and run programs on the calling thread; True
    if applied."""
    if _accelerator_installed() or _backend_started():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt)
        return False
    # -1: "disables trimming completely" (mallopt(3)). The largest positive value, 2**31 - 1, still trimmed a
    # free heap top above 2 GiB: OpenELM-270M's step (batch 2 x 256) page-faulted its 2.1 GiB of scratch back
    # in every step (534k faults, 13% of its samples in the kernel).
    ok = bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1))
    log.debug("keep_scratch_in_heap: mallopt %s", "applied" if ok else "refused")
    if ok:
        _run_inline()
    return ok


def _run_inline() -> None:
    """Turn JAX's async CPU dispatch off: now if JAX is imported, else as soon as it is."""
    jax = sys.modules.get("jax")
    if jax is not None and hasattr(jax, "config"):
        jax.config.update(_INLINE_FLAG, False)
    elif not any(isinstance(f, _AfterJaxImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterJaxImport())


class _AfterJaxImport(importlib.abc.MetaPathFinder):
    """Finds ``jax`` with the finders after it, and sets the dispatch flag once its package has run (then leaves
    ``sys.meta_path``). A ``find_spec("jax")`` that imports nothing (a check whether jax is installed) changes
    nothing: the next lookup is patched again."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "jax" or self not in sys.meta_path:
            return None
        later = sys.meta_path[sys.meta_path.index(self) + 1:]
        spec = next((s for f in later if hasattr(f, "find_spec") for s in [f.find_spec(fullname, path, target)]
                     if s is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_set(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            module.config.update(_INLINE_FLAG, False)

        spec.loader.exec_module = exec_then_set  # this spec's own loader instance
        return spec
