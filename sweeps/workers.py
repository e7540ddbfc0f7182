"""``sweeps.run GRID --jobs N``: N worker processes on this machine's CPU, one core each.

A small model's train step uses a second core poorly (2 XLA threads train
a 150k-parameter model only about 1.5x faster than 1), so on a laptop the
cores are better spent on different runs: N pinned single-core processes
train N runs at once, and one worker's compile overlaps another's training.
Each worker starts JAX with the machine's cores and only then moves its
threads onto its own core (:func:`pin_after_start`), so its XLA thread pool
splits work as one driver's does: a run trains to the same bits in a
worker as in one driver (README, 'Sweeps').

Each worker is an ordinary driver over the whole plan (``sweeps.run ...
--worker``): it takes the next run nobody holds (the per-run locks of
``sweeps.locks`` hand out the work), waits for the runs another worker holds
instead of leaving them, and trains them itself if that worker dies. The
workers are forced onto the CPU (``JAX_PLATFORMS=cpu``) and pinned to
their own cores (:func:`core_sets`). This parent starts them, prefixes
their output with ``wK|``, forwards SIGINT/SIGTERM (each worker checkpoints
and stops), and returns the worst exit status; ``sweeps.run`` then rebuilds
the results and writes the report.
Pure Python: the parent never starts JAX.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

EXIT_INTERRUPTED = 130


def worker_env(env: dict | None = None) -> dict:
    """The environment of a worker: the caller's, on the CPU, with unbuffered output."""
    env = dict(os.environ if env is None else env)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the parent as they are printed
    return env


def program_group(run) -> str:
    """Runs that compile the same programs: the config without its seeds (and where it is written)."""
    from sweeps.tune import SEED_PATHS, identity_without

    return json.dumps(identity_without(run.config, SEED_PATHS), sort_keys=True)


def worker_order(runs: list, index: int, count: int) -> list:
    """Worker ``index`` of ``count``: its own groups of same-program runs first, then everyone else's.

    Groups (:func:`program_group`) in plan order are dealt out in a snake
    (0, 1, ..., count-1, count-1, ..., 0, 0, 1, ...), so each worker compiles
    its models once and trains all their seeds with the programs in memory,
    while the workers start on different models. Round robin would give one
    worker every group at even positions: in a grid whose arms alternate
    (layer-wise, uniform, layer-wise, ...) that is every layer-wise model,
    whose programs take about twice as long to compile (in the quickstart
    the other worker ran out of work first, took one layer-wise run, and the
    sweep ended with one worker idle for ~10 s; dealt in a snake, ~1.5 s).
    The other groups follow, so a worker that runs out of its own work takes
    over what nobody holds yet (the locks decide who trains what).
    """
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(program_group(run), []).append(run)
    ordered = list(groups.values())
    owner = [i % count if (i // count) % 2 == 0 else count - 1 - i % count for i in range(len(ordered))]
    mine = [g for g, w in zip(ordered, owner) if w == index]
    rest = [g for g, w in zip(ordered, owner) if w != index]
    return [run for g in mine + rest for run in g]


def core_sets(jobs: int, available: list[int] | None = None) -> list[list[int]]:
    """The cores each worker may run on: this process's cores split into ``jobs`` contiguous sets
    (round robin, one core each, when there are more workers than cores).

    Two workers whose threads roam over all cores slow each other down
    (measured: 10.5k tokens/s per worker unpinned against 15k pinned, for a
    490k-parameter model)."""
    cores = sorted(os.sched_getaffinity(0)) if available is None else sorted(available)
    if jobs > len(cores):
        return [[cores[i % len(cores)]] for i in range(jobs)]
    return [cores[i * len(cores) // jobs:(i + 1) * len(cores) // jobs] for i in range(jobs)]


CORES_ENV = "ELMJAX_WORKER_CORES"  # the cores a worker moves onto once its JAX CPU client has started


def pin_after_start() -> None:
    """In a worker: start JAX's CPU client with the process's full affinity, then move every thread onto the
    worker's cores (``ELMJAX_WORKER_CORES``).

    XLA:CPU sizes its thread pool from the cores it may use at start, and
    the pool's size can decide how an op splits its work, hence the last
    bits. Pinned before the start (one thread), a worker's 400k-parameter
    runs drifted from one driver's by ~1e-7 until the CPU attention's
    backward stopped using dots with a transposed operand (2026-12-01);
    pinned after, they match it bit for bit whatever the ops, while each
    worker still keeps to its own core. Threads made later inherit the
    affinity of the (pinned) thread that makes them.
    """
    cores = os.environ.get(CORES_ENV)
    if not cores:
        return
    import jax

    jax.devices()
    wanted = {int(c) for c in cores.split(",")}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), wanted)
        except OSError:  # a thread that ended meanwhile
            pass


def _relay(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"w{index}| {line}")
        out.flush()
    stream.close()


def run_workers(argv: list[str], jobs: int, out=None) -> int:
    """Run ``python -m sweeps.run *argv --worker I/jobs`` for I < ``jobs`` at once; the worst exit status.

    Interrupted (SIGINT/SIGTERM to this process): every worker gets SIGTERM,
    saves a checkpoint and exits; returns 130."""
    out = sys.stdout if out is None else out
    cmd = [sys.executable, "-m", "sweeps.run", *argv]
    cores = core_sets(jobs)
    procs = [subprocess.Popen([*cmd, "--worker", f"{i}/{jobs}"], env={**worker_env(), CORES_ENV: ",".join(map(str, c))},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
             for i, c in enumerate(cores)]
    relays = [threading.Thread(target=_relay, args=(i, p.stdout, out), daemon=True) for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    interrupted = False

    def _stop(signum, frame):
        nonlocal interrupted
        interrupted = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    on_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)} if on_main else {}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    for t in relays:
        t.join(timeout=5)
    if interrupted or EXIT_INTERRUPTED in codes:
        return EXIT_INTERRUPTED
    return max(codes, key=_severity)


def _severity(code: int) -> int:
    """0 (all done) < 1 (some runs failed) < anything else (a worker crashed or was refused)."""
    return {0: 0, 1: 1}.get(code, 2 + abs(code))
