"""Run a plan: skip finished runs, resume interrupted ones, isolate failures.

For each run of this driver's share of the plan, in plan order:

* ``done``: skipped (a stale lock a killed driver left in it is removed);
* ``diverged`` (a result, not an accident): skipped unless
  ``retry_diverged`` (e.g. the divergence came from a corrupted checkpoint
  since replaced); a retry resumes from the run's last checkpoint;
* ``failed``: skipped unless ``retry_failed``; a retry resumes from the
  run's last checkpoint;
* locked by a live driver elsewhere: skipped (that driver trains it);
* otherwise the run's lock is taken and ``elmjax.train.run`` trains it,
  resuming from the latest checkpoint if an earlier driver was killed;
  meanwhile the programs of a later run may compile on a background thread
  (``sweeps.ahead``, ``Options.compile_ahead``).

A run that raises (including out-of-memory errors) is recorded as
``failed`` with its error, and the sweep goes on. SIGINT/SIGTERM stop the
sweep after the trainer has saved a checkpoint (the run goes back to
``pending``); rerunning the same command picks up where it stopped.
``results.parquet`` is rebuilt after every run. With ``eval: {tasks: [...]}``
in the grid, every finished run is also scored on those task files
(``sweeps.evals``), including runs finished by earlier invocations.

Multi-host runs: when ``jax.distributed`` is initialised (see
``elmjax.distributed``), every process of the slice runs this same driver;
process 0 alone reads states and holds locks, and broadcasts each decision
so all processes train the same run together.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from elmjax import config_io, run_dir as rd
from sweeps import ahead as compile_ahead
from sweeps.evals import EvalSpec, evaluate_run, needs_eval
from sweeps.grid import Grid
from sweeps.locks import HEARTBEAT_S, STALE_AFTER_S, FileLock, clear_stale, holder, run_lock_path
from sweeps.plan import PlannedRun, write_plan
from sweeps.progress import SweepProgress
from sweeps.results import read_run_status, write_results

GRID_COPY = "grid.yaml"
_TRAIN, _DONE, _DIVERGED, _FAILED, _LOCKED = range(5)
POLL_S = 1.0  # how often a waiting worker looks at the locks of runs another driver holds
_SKIP_REASON = {_DONE: "already done", _DIVERGED: "diverged earlier (a result; rerun with --retry-diverged to retry it)",
                _FAILED: "failed earlier (rerun with --retry-failed to retry)", _LOCKED: "held by another driver"}
HELD = "skipped (held by another driver)"


@dataclass(frozen=True)
class Options:
    retry_failed: bool = False
    retry_diverged: bool = False
    progress: bool = True
    stale_after_s: float = STALE_AFTER_S
    heartbeat_s: float = HEARTBEAT_S
    shard_index: int = -1  # this driver's shard (-1: none); all processes of a multi-host run must agree
    eval: EvalSpec = EvalSpec()  # downstream tasks to score finished runs on
    compile_ahead: str = "auto"  # compile the next run's programs while one trains (sweeps.ahead)
    # Local worker (index, count) of sweeps.run --jobs (sweeps.workers): it takes its own models' runs first,
    # waits for the runs other drivers hold instead of leaving them, and trains any whose holder dies.
    worker: tuple[int, int] | None = None

    @property
    def wait_for_held(self) -> bool:
        return self.worker is not None


@dataclass
class Summary:
    counts: dict = field(default_factory=dict)  # outcome -> number of runs this driver handled
    held: list = field(default_factory=list)  # runs skipped because another live driver held them

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def __str__(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in self.counts.items()) or "nothing to do"


def prepare(grid: Grid, runs: list[PlannedRun], sweep_dir: Path) -> list[PlannedRun]:
    """Write grid.yaml, plan.json and every run's config.yaml; return the runs with their run_dir set."""
    sweep_dir = Path(sweep_dir).resolve()
    copy = sweep_dir / GRID_COPY
    if copy.exists() and copy.read_text() != grid.text:
        print(f"note: {copy} differs from {grid.path}; runs whose config changed get new directories "
              "(old ones stay on disk but leave results.parquet)", file=sys.stderr)
    config_io.atomic_write_text(copy, grid.text)
    write_plan(runs, sweep_dir, grid.name)
    located = []
    for run in runs:
        run_dir = sweep_dir / "runs" / run.name
        # The sweep's own bar replaces the trainer's; progress is not part of a run's identity.
        cfg = run.config.replace(run_dir=str(run_dir), train=dataclasses.replace(run.config.train, progress=False))
        if not (run_dir / "config.yaml").exists():
            config_io.atomic_write_text(run_dir / "config.yaml", config_io.dump_yaml(cfg))
        located.append(dataclasses.replace(run, config=cfg))
    return located


def _process() -> tuple[int, int]:
    import jax

    from elmjax.distributed import maybe_initialize

    maybe_initialize()
    return jax.process_index(), jax.process_count()


def _agree(code: int, count: int) -> int:
    """Process 0's decision, on every process."""
    if count == 1:
        return code
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


def _check_same_shard(index: int, count: int) -> None:
    """Every process of a multi-host run must run the same shard, or they would wait on each other forever."""
    if count == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    seen = sorted({int(x) for x in np.ravel(multihost_utils.process_allgather(np.int32(index)))})
    if len(seen) > 1:
        raise RuntimeError(f"the processes of this multi-host run are on different shards {seen}; "
                           "JOB_COMPLETION_INDEX numbers the hosts of a slice, not shards: pass --shard I/N")


def _decide(run: PlannedRun, opts: Options) -> tuple[int, FileLock | None]:
    run_dir = Path(run.config.run_dir)
    state = read_run_status(run_dir)["state"]
    retry = {s for s, wanted in (("failed", opts.retry_failed), ("diverged", opts.retry_diverged)) if wanted}
    finished = {"done": _DONE, "diverged": _DIVERGED, "failed": _FAILED}
    if state in finished and state not in retry:
        clear_stale(run_lock_path(run_dir), opts.stale_after_s)
        return finished[state], None
    lock = FileLock.acquire(run_lock_path(run_dir), stale_after_s=opts.stale_after_s, heartbeat_s=opts.heartbeat_s)
    if lock is None:
        return _LOCKED, None
    again = read_run_status(run_dir)["state"]  # another driver may have finished it just before we locked
    if again in finished and again != state:
        lock.release()
        return finished[again], None
    return _TRAIN, lock


def _train(run: PlannedRun, progress: SweepProgress, lead: bool) -> tuple[str, str]:
    """Train one run; (state, detail). Exceptions other than interrupts become 'failed'."""
    from elmjax import train

    try:
        result = train.run(run.config, progress_callback=progress.callback)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one run's failure must not stop the sweep
        traceback.print_exc()
        error = "".join(traceback.format_exception_only(type(e), e)).strip()
        if lead and rd.read_status(run.config.run_dir)["state"] != "failed":
            rd.write_status(run.config.run_dir, "failed", error=error, total_steps=run.config.total_steps)
        return "failed", f": {error.splitlines()[0][:300]}"
    if result.state == "diverged":
        return "diverged", f": {rd.read_status(result.run_dir).get('error')}"
    return "done", f": val_loss {result.final['val_loss']:.4f}" if result.final else ""


def _evaluate(run: PlannedRun, spec: EvalSpec, progress: SweepProgress) -> bool:
    """Score a finished run on the grid's tasks if it lacks those scores; True if it was scored.

    A failed evaluation is reported and leaves the run done: the scores are
    retried on the next invocation."""
    if not needs_eval(run.config.run_dir, spec):
        return False
    try:
        record = evaluate_run(run.config.run_dir, spec)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the trained run is safe; only its scores are missing
        traceback.print_exc()
        progress.write(f"warning: evaluating {run.name} failed ({type(e).__name__}: {e}); rerun to retry")
        return False
    scores = ", ".join(f"{t} acc {r['acc']:.3f}" for t, r in record["tasks"].items())
    progress.write(f"    {run.name}: {scores}")
    return True


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_sweep(runs: list[PlannedRun], sweep_dir: Path, opts: Options = Options()) -> Summary:
    """Train this driver's runs (already located by ``prepare``); see the module docstring.

    With ``opts.wait_for_held`` the runs another driver holds are waited for
    and looked at again once released: done by then, or trained here if
    their holder died. A second look never retries a failed run (its holder
    just did)."""
    if opts.worker is not None:
        from sweeps.workers import worker_order

        runs = worker_order(runs, *opts.worker)
    summary = _pass(runs, sweep_dir, opts)
    while opts.wait_for_held and summary.held:
        wait_for_release(summary.held, opts.stale_after_s)
        again = _pass(summary.held, sweep_dir, dataclasses.replace(opts, retry_failed=False, retry_diverged=False))
        for outcome, n in again.counts.items():
            if outcome != HELD:
                summary.counts[outcome] = summary.counts.get(outcome, 0) + n
        summary.held = again.held
        summary.counts.pop(HELD, None)  # every held run has been looked at again and counted there
    return summary


def wait_for_release(runs: list[PlannedRun], stale_after_s: float, poll_s: float = POLL_S) -> None:
    """Block until no live driver holds any of ``runs`` (a dead holder's lock counts as released)."""
    while any(holder(r.config.run_dir, stale_after_s) is not None for r in runs):
        time.sleep(poll_s)


def _pass(runs: list[PlannedRun], sweep_dir: Path, opts: Options) -> Summary:
    index, count = _process()
    lead = index == 0
    _check_same_shard(opts.shard_index, count)
    summary = Summary()
    if lead:
        write_results(sweep_dir)
    progress = SweepProgress(runs, enabled=opts.progress and lead)
    old_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _main_thread() else None
    ahead = _ahead(runs, opts) if lead and compile_ahead.enabled(opts.compile_ahead, count) else None
    try:
        for i, run in enumerate(runs):
            code, lock = _decide(run, opts) if lead else (_TRAIN, None)
            code = _agree(code, count)
            if code != _TRAIN:
                summary.add(f"skipped ({_SKIP_REASON[code].split(' (')[0]})")
                if code == _LOCKED:
                    summary.held.append(run)
                    if opts.wait_for_held:
                        continue  # looked at again once released; a worker need not say so
                progress.skip(run, _SKIP_REASON[code])
                if code == _DONE and lead and _evaluate(run, opts.eval, progress):
                    write_results(sweep_dir)
                continue
            progress.start(run)
            if ahead is not None:
                ahead.before(i)
            try:
                state, detail = _train(run, progress, lead)
            finally:
                if lock is not None:
                    if lock.lost:
                        progress.write(f"warning: the lock of {run.name} was broken while it trained "
                                       f"(heartbeats stalled for over {opts.stale_after_s:.0f} s)")
                    lock.release()
                if lead:
                    write_results(sweep_dir)
            summary.add(state)
            progress.finish(run, state, detail)
            if state == "done" and lead and _evaluate(run, opts.eval, progress):
                write_results(sweep_dir)
    finally:
        compile_ahead.stop()
        progress.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return summary


def _ahead(runs: list[PlannedRun], opts: Options) -> compile_ahead.Ahead:
    retry = {s for s, wanted in (("failed", opts.retry_failed), ("diverged", opts.retry_diverged)) if wanted}
    return compile_ahead.Ahead(runs, retry, opts.stale_after_s)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def write_report(sweep_dir: Path) -> Path | None:
    """``analysis.report.write_report(sweep_dir)`` if the analysis package can; a clear note if not."""
    try:
        from analysis.report import write_report as report
    except ImportError as e:
        print(f"note: no report written (analysis.report is not importable: {e}); "
              f"run `python -m analysis.report {sweep_dir}` once it is", file=sys.stderr)
        return None
    try:
        out = report(sweep_dir)
    except Exception as e:  # noqa: BLE001 - the results are already safe on disk
        traceback.print_exc()
        print(f"note: the report failed ({type(e).__name__}: {e}); the results table is complete; "
              f"retry with `python -m analysis.report {sweep_dir}`", file=sys.stderr)
        return None
    return Path(out) if out is not None else Path(sweep_dir) / "report"
