"""Compile the next run's programs while this one trains (``python -m sweeps.run --compile-ahead``).

Before each run this driver trains, the first later run of the plan whose
programs (``elmjax.programs.program_key``) are neither kept nor in flight is
handed to ``elmjax.programs.compile_ahead``, which compiles them on one
background thread. When the driver reaches that run, it takes the programs
ready, or waits for the compile in flight; its ``compile_s`` is that wait.
Only runs this driver will train are looked at (pending or resumable, not
finished, lock free or stale), and only runs of the list it was given, whose
configs are final (a tuned sweep hands over its main runs only once tuning
has chosen their values). One run at a time is compiled for: the next only
once the driver has reached it, so the registry (``elmjax.programs.KEEP``)
never has to evict what a near run needs.

``auto`` turns it on for accelerators (the host is idle while they train)
and off on CPU, where the compile competes with the training step for the
same cores (see the README for the measurement). Multi-host drivers never
compile ahead: each process would have to agree on the plan ahead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sweeps.locks import holder
from sweeps.plan import PlannedRun
from sweeps.results import read_run_status

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
WINDOW = 64  # later runs looked at for the next program set (a ladder's seeds of one shape come in a block)
_TRAINABLE = {"pending", "running"}


def enabled(mode: str, process_count: int) -> bool:
    """Whether this driver compiles ahead under ``--compile-ahead mode``."""
    if mode not in MODES:
        raise ValueError(f"--compile-ahead: one of {MODES}, got {mode!r}")
    if mode == "off" or process_count > 1:
        return False
    if mode == "on":
        return True
    import jax

    return jax.default_backend() != "cpu"


class Ahead:
    """Picks and starts the next ahead-of-time compile for ``runs`` (this driver's, in plan order)."""

    def __init__(self, runs: list[PlannedRun], retry: set[str], stale_after_s: float):
        self.runs, self.stale_after_s = runs, stale_after_s
        self.trainable = _TRAINABLE | retry
        self.target = -1  # index of the run compiled for last

    def before(self, index: int) -> PlannedRun | None:
        """``runs[index]`` is about to train: start compiling for a later run; return it (None if none)."""
        from elmjax import programs
        from elmjax.sharding import make_mesh
        from elmjax.train import setup_compilation_cache

        if self.target > index:
            return None  # the driver has not reached the run compiled for last
        current = self.runs[index].config
        for target in range(index + 1, min(index + 1 + WINDOW, len(self.runs))):
            run = self.runs[target]
            cfg = run.config
            if cfg.compilation_cache != current.compilation_cache:
                continue  # compiled under another cache directory than the one set now
            try:
                mesh = make_mesh(cfg.mesh)
                if programs.is_kept(cfg, mesh) or not self._will_train(run):
                    continue
            except Exception as e:  # noqa: BLE001 - a bad mesh or status file is that run's error, reported when it runs
                log.debug("not compiling ahead for %s: %s", run.name, e)
                continue
            # Set now, in this thread: JAX decides once, at its first compile, whether a cache is used.
            setup_compilation_cache(cfg.compilation_cache)
            programs.compile_ahead(cfg, mesh)
            self.target = target
            return run
        return None

    def _will_train(self, run: PlannedRun) -> bool:
        run_dir = Path(run.config.run_dir)
        state = read_run_status(run_dir).get("state", "pending")
        return state in self.trainable and holder(run_dir, self.stale_after_s) is None


def summary() -> str | None:
    """One line on what was compiled ahead in this process (None if nothing was)."""
    programs = sys.modules.get("elmjax.programs")
    stats = programs.stats if programs is not None else None
    if stats is None or not (stats.compiled or stats.failed):
        return None
    failed = f"; {stats.failed} failed (those runs compiled for themselves)" if stats.failed else ""
    return (f"compiled ahead: {stats.compiled} program set(s), {stats.seconds:,.0f} s on a background thread "
            f"while runs trained{failed}")


def stop() -> None:
    """Cancel a compile that has not started yet (one in flight finishes; the process waits for it at exit)."""
    programs = sys.modules.get("elmjax.programs")
    if programs is not None:
        programs.stop_ahead()
