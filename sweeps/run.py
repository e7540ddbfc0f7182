"""python -m sweeps.run GRID.yaml [--out DIR] [--dry-run] [--retry-failed] [--retry-diverged] [--shard I/N]
       python -m sweeps.run GRID.yaml --preflight [--devices N] [--hbm-gib G] [--accelerator A]

Plans the grid (validating everything and solving every budget before
anything is written), then trains this driver's runs into
``runs/<grid name>/`` (or ``--out DIR``). Rerun the same command to resume.
The sweep directory must be new, empty or a sweep (``plan.json``); any other
non-empty directory is refused unless ``--force``.
Exit status: 0 every run of this driver's share is done or diverged (or
held by another driver), 1 some are failed, 2 the grid (or a flag) is
invalid, 130 interrupted.

``--preflight`` trains nothing: it compiles every distinct model and mesh of
the plan (on N fake CPU devices with ``--devices N``) and prints their memory
and cost (``sweeps.preflight``); exit 1 if one would not fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elmjax.config_io import ConfigError
from elmjax.cpu_heap import keep_scratch_in_heap
from sweeps import ahead
from sweeps.driver import GRID_COPY, Options, prepare, run_sweep, write_report
from sweeps.grid import load_grid
from sweeps.locks import HEARTBEAT_S, MIN_STALE_AFTER_S, STALE_AFTER_S
from sweeps.plan import PLAN_FILE, build_plan, format_table
from sweeps.preflight import add_arguments as add_preflight_arguments, run_preflight
from sweeps.results import CSV, PARQUET, read_run_status, write_results
from sweeps.shard import COUNT_ENV, ShardError, detect_shard
from sweeps.status import format_time_shares, status_rows
from sweeps.tune import describe, plan_stage, run_tuned
from sweeps.workers import EXIT_INTERRUPTED, run_workers

SWEEP_MARKERS = (PLAN_FILE, GRID_COPY)  # a directory holding either is a sweep (a killed first start leaves only grid.yaml)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.splitlines()[0])
    p.add_argument("grid", help="grid YAML file")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default: runs/<grid name>)")
    p.add_argument("--dry-run", action="store_true", help="print the table of runs and exit")
    p.add_argument("--force", action="store_true",
                   help="write into an existing non-empty directory that is not a sweep (no plan.json)")
    p.add_argument("--retry-failed", action="store_true", help="retry runs whose status is failed")
    p.add_argument("--retry-diverged", action="store_true",
                   help="retry runs whose status is diverged (from their last checkpoint)")
    p.add_argument("--shard", metavar="I/N", help="run only task I of N (0-based); also read from "
                   f"SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX + {COUNT_ENV}")
    p.add_argument("--shards", type=int, metavar="N", help="shard count with JOB_COMPLETION_INDEX (Kubernetes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (per-run lines only)")
    p.add_argument("--no-report", action="store_true", help="do not call analysis.report at the end")
    p.add_argument("--lock-timeout", type=float, default=STALE_AFTER_S, metavar="S",
                   help=f"seconds without a heartbeat after which a lock held from another host is stale "
                   f"(default {STALE_AFTER_S:.0f}, at least {MIN_STALE_AFTER_S:.0f}; heartbeat every "
                   f"min({HEARTBEAT_S:.0f}, S/4) s)")
    p.add_argument("--compile-ahead", choices=ahead.MODES, default="auto",
                   help="compile the next run's programs on a background thread while a run trains: auto (default) "
                   "= on with an accelerator, off on CPU, where the compile takes cores from training (README)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once in N worker processes on this machine's CPU, one core each "
                   "(small models on a multi-core CPU; same numbers; README, 'Sweeps')")
    p.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)  # worker I of --jobs N's processes
    add_preflight_arguments(p)
    return p


def _check_flags(args) -> None:
    if args.jobs < 1:
        raise ConfigError(f"--jobs: need at least 1 worker, got {args.jobs}")
    if args.jobs > 1 and (args.preflight or args.worker):
        raise ConfigError("--jobs: not with --preflight (it trains nothing)" if args.preflight else
                          "--jobs: a worker does not start workers")
    # A lock timeout that expires between heartbeats would let two drivers train one run at once.
    if not args.lock_timeout >= MIN_STALE_AFTER_S:  # also catches nan
        raise ConfigError(f"--lock-timeout: must be at least {MIN_STALE_AFTER_S:.0f} seconds, got {args.lock_timeout:g} "
                          "(a shorter timeout lets a second driver take the lock of a run that is still training)")


def _is_sweep(names: list[str]) -> bool:
    """Whether a directory holding ``names`` is a sweep: a marker, or a marker being written (another driver,
    or another process of a multi-host sweep, may be in the middle of its atomic write right now)."""
    return any(n == f or (n.startswith(f".{f}.") and n.endswith(".tmp")) for n in names for f in SWEEP_MARKERS)


def _check_out(sweep_dir: Path, force: bool) -> None:
    """Refuse a sweep directory that would overwrite something that is not a sweep (results.csv, report/ ...)."""
    for parent in [sweep_dir, *sweep_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"sweep directory {sweep_dir}: {parent} is a file, not a directory")
            break
    if not sweep_dir.is_dir() or force:
        return
    # One listing, judged as a whole: checking a marker and then its temporary file one after the other
    # missed both when a second driver's rename fell between the two checks.
    names = [p.name for p in sweep_dir.iterdir()]
    if names and not _is_sweep(names):
        raise ConfigError(f"sweep directory {sweep_dir}: an existing non-empty directory that is not a sweep (no {PLAN_FILE}); "
                          "choose another directory, or pass --force to write the sweep into it anyway")


def _dry_run_tuned(grid, runs, shard) -> int:
    stage = plan_stage(grid, runs, None)
    print(describe(grid, stage, runs))
    print("\nstage 1: tuning runs")
    mine = shard.select(stage.tune_runs) if shard else stage.tune_runs
    print(format_table(mine))
    print(f"\nstage 2: main runs (shown at the base {grid.tune.axis}; each cell trains at its chosen value)")
    print(format_table(runs))
    return 0


def main(argv=None) -> int:
    keep_scratch_in_heap()  # before JAX starts its CPU client; see elmjax.cpu_heap
    args = _parser().parse_args(argv)
    try:
        _check_flags(args)
        grid = load_grid(args.grid)
        runs = build_plan(grid)
        shard = detect_shard(args.shard, args.shards)
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.preflight:
        return run_preflight(runs, args.devices, args.accelerator, args.hbm_gib)
    if args.dry_run:
        if grid.tune is not None:
            return _dry_run_tuned(grid, runs, shard)
        mine = shard.select(runs) if shard else runs
        print(format_table(mine))
        if shard:
            print(f"{shard}: {len(mine)} of {len(runs)} runs")
        return 0
    sweep_dir = Path(args.out) if args.out else Path("runs") / grid.name
    try:
        _check_out(sweep_dir, args.force)
        # A tuned sweep plans its runs stage by stage (sweeps.tune); the rest is planned up front.
        located = prepare(grid, runs, sweep_dir) if grid.tune is None else []
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the sweep to {sweep_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    todo = shard.select(located) if shard else located
    where = f", {shard}: {len(todo)} of them" if shard else ""
    tuned = f" (+ tuning runs of {grid.tune.axis} first; see tune.json)" if grid.tune is not None else ""
    print(f"sweep '{grid.name}': {len(runs)} runs{tuned} in {sweep_dir}{where}")
    if args.jobs > 1:
        return _run_jobs(args, grid, shard, sweep_dir, todo)
    if args.worker:
        from sweeps.workers import pin_after_start

        pin_after_start()  # before anything compiles: see its docstring
    opts = Options(retry_failed=args.retry_failed, retry_diverged=args.retry_diverged,
                   progress=not (args.no_progress or args.worker), stale_after_s=args.lock_timeout,
                   heartbeat_s=min(HEARTBEAT_S, args.lock_timeout / 4), shard_index=shard.index if shard else -1,
                   eval=grid.eval, compile_ahead="off" if args.worker else args.compile_ahead,
                   worker=_worker(args.worker))
    try:
        if grid.tune is not None:
            summary = run_tuned(grid, runs, sweep_dir, opts, shard.select if shard else (lambda r: r))
            final = prepare(grid, plan_stage(grid, runs, sweep_dir).runs, sweep_dir)
            todo = shard.select(final) if shard else final
        else:
            summary = run_sweep(todo, sweep_dir, opts)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'SIGINT'}); rerun the same command to resume", file=sys.stderr)
        return 130
    except ConfigError as e:  # a damaged run file (e.g. a torn status.json)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nthis driver: {summary}")
    if args.worker:
        return 0  # failed runs are the parent's to report, once
    compiled_ahead = ahead.summary()
    if compiled_ahead:
        print(compiled_ahead)
    return _finish(args, sweep_dir, todo)


def _worker(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, _, count = text.partition("/")
    return int(index), int(count)


def _run_jobs(args, grid, shard, sweep_dir: Path, todo) -> int:
    """``--jobs N``: N workers train the plan (sweeps.workers); then the results and the report, once."""
    print(f"{args.jobs} worker processes, one CPU core each (their output is prefixed wK|)")
    code = run_workers(_worker_argv(args, shard, sweep_dir), args.jobs)
    if code == EXIT_INTERRUPTED:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return code
    if code not in (0, 1):
        print(f"error: a worker exited with status {code} (its output is above); "
              "rerun the same command to resume", file=sys.stderr)
    write_results(sweep_dir)
    if grid.tune is not None:
        final = prepare(grid, plan_stage(grid, build_plan(grid), sweep_dir).runs, sweep_dir)
        todo = shard.select(final) if shard else final
    finished = _finish(args, sweep_dir, todo)
    return finished if code in (0, 1) else 1


def _worker_argv(args, shard, sweep_dir: Path) -> list[str]:
    """A worker's command line: this sweep's settings, spelled out (the report is the parent's)."""
    argv = [args.grid, "--out", str(sweep_dir), "--no-report", "--lock-timeout", repr(args.lock_timeout)]
    argv += ["--retry-failed"] * args.retry_failed + ["--retry-diverged"] * args.retry_diverged
    argv += ["--force"] * args.force
    return argv + (["--shard", f"{shard.index}/{shard.count}"] if shard else [])


def _finish(args, sweep_dir: Path, todo) -> int:
    """The end of a sweep: the time shares, where the results are, the report; exit 1 if runs failed."""
    shares = format_time_shares(status_rows(sweep_dir))
    if shares:
        print(shares)
    print(f"results: {sweep_dir / PARQUET} (and {CSV}); states: python -m sweeps.status {sweep_dir}")
    report = None if args.no_report else write_report(sweep_dir)
    if report is not None:
        print(f"report:  {report}")
    failed = [r.name for r in todo if read_run_status(r.config.run_dir)["state"] == "failed"]
    if failed:
        print(f"{len(failed)} failed run(s) (see python -m sweeps.status {sweep_dir} --errors); "
              "rerun with --retry-failed to retry them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
