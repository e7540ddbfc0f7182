"""``sweeps.run --jobs N``: local workers share a plan through the run locks, wait for each other, and
train every run once, to the same numbers as one driver."""

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from elmjax import run_dir as rd
from sweeps import driver, run, workers
from sweeps.grid import load_grid
from sweeps.locks import FileLock, run_lock_path
from sweeps.plan import build_plan
from sweeps.results import read_results
from sweep_helpers import TINY_BASE, write_grid

AXES = {"budget": {"kind": "params", "values": [4e4]}, "allocation": {"openelm": "openelm", "uniform": "uniform"},
        "seed": [0, 1]}
ROOT = Path(__file__).resolve().parents[1]


def test_a_worker_runs_on_the_cpu_and_keeps_the_callers_xla_flags():
    env = workers.worker_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x", "PATH": "/bin"})
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x" and env["PATH"] == "/bin"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PYTHONUNBUFFERED"] == "1"


_STEPS = """
import hashlib, os, sys
import numpy as np
from sweeps import workers
workers.pin_after_start()  # with ELMJAX_WORKER_CORES set (the "after" run)
import jax
from sweeps.grid import load_grid
from sweeps.plan import build_plan
from elmjax.sharding import make_mesh
from elmjax.state import state_layout
from elmjax.train_program import jit_train_step
from elmjax import programs
from elmjax.data import train_iterator
cfg = build_plan(load_grid("sweeps/grids/quickstart.yaml"))[8].config  # a 400k-parameter model
mesh = make_mesh(cfg.mesh)
layout = state_layout(cfg, mesh)
state = programs._compile_create(mesh, layout, programs.CPU_INIT_OPTIONS)(np.int32(0))
step = jit_train_step(cfg, mesh, layout)
batches = train_iterator(cfg.data)
for _ in range(60):
    state, _ = step(state, next(batches))
leaves = jax.tree.leaves(jax.device_get(state.params))
cores = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(hashlib.sha1(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest(), sorted(map(sorted, cores)))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell a pinned pool from a full one")
def test_a_worker_pins_its_threads_after_jax_starts_so_it_trains_to_one_drivers_bits():
    """60 steps of a 400k-parameter model: in a process free on every core, and in a worker pinned after JAX
    started (pin_after_start). Until 2026-12-01 a process pinned before JAX started (a one-thread XLA pool)
    trained this model to other bits, which the test showed; since the CPU attention's backward stopped
    using dots with a transposed operand, the step's bits no longer depend on the pool's size for the
    quickstart's models, but the worker still starts JAX on every core, in case an op splits work again."""
    def train(mode, cores=None):
        env = {**workers.worker_env(), "XLA_FLAGS": ""}  # one CPU device, as a sweep on a laptop
        env.pop(workers.CORES_ENV, None)
        if cores is not None:
            env[workers.CORES_ENV] = cores
        out = subprocess.run([sys.executable, "-c", _STEPS, mode], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        digest, _, cores_seen = out.stdout.strip().splitlines()[-1].partition(" ")
        return digest, cores_seen

    free, free_cores = train("free")
    after, after_cores = train("after", cores="0")
    assert after_cores == "[[0]]", "every thread of the worker must end up on its core"
    assert free_cores != "[[0]]"
    assert after == free


def test_workers_start_on_different_models_and_each_trains_its_models_seeds_in_a_row(tmp_path):
    """Runs of one model (all its seeds) form a group; groups are dealt out (a snake), the rest follow."""
    runs = _located(tmp_path)  # plan order: openelm s0, uniform s0, openelm s1, uniform s1
    names = [r.name for r in runs]
    first = [r.name for r in workers.worker_order(runs, 0, 2)]
    second = [r.name for r in workers.worker_order(runs, 1, 2)]
    openelm, uniform = [n for n in names if n.startswith("openelm")], [n for n in names if n.startswith("uniform")]
    assert first == openelm + uniform and second == uniform + openelm
    assert sorted(first) == sorted(names) and workers.worker_order(runs, 0, 1) == [*
        [r for r in runs if r.name.startswith("openelm")], *[r for r in runs if r.name.startswith("uniform")]]


def test_groups_are_dealt_in_a_snake_so_alternating_arms_do_not_all_land_on_one_worker(monkeypatch):
    """Plan order alternates the arms (layer-wise, uniform) over three budgets: dealt round robin, worker 0
    would get all three layer-wise models (the slow ones to compile); in a snake each worker gets both arms."""
    from types import SimpleNamespace

    names = [f"{arm}-{budget}-s{seed}" for budget in ("150k", "250k", "400k") for seed in (0, 1)
             for arm in ("openelm", "uniform")]
    runs = [SimpleNamespace(name=n) for n in names]
    monkeypatch.setattr(workers, "program_group", lambda run: run.name.rsplit("-", 1)[0])

    def groups(index, count):
        return list(dict.fromkeys(r.name.rsplit("-", 1)[0] for r in workers.worker_order(runs, index, count)))

    # Own groups first (0: groups 0, 3, 4 of the plan; 1: groups 1, 2, 5), then the others in plan order.
    assert groups(0, 2) == ["openelm-150k", "uniform-250k", "openelm-400k", "uniform-150k", "openelm-250k",
                            "uniform-400k"]
    assert groups(1, 2) == ["uniform-150k", "openelm-250k", "uniform-400k", "openelm-150k", "uniform-250k",
                            "openelm-400k"]
    assert groups(3, 4)[:2] == ["uniform-250k", "openelm-400k"]  # 4 workers: owners 0, 1, 2, 3, 3, 2
    assert groups(2, 4)[:2] == ["openelm-250k", "uniform-400k"]
    for count in (1, 2, 3, 4, 7):
        orders = [[r.name for r in workers.worker_order(runs, i, count)] for i in range(count)]
        assert all(sorted(o) == sorted(names) for o in orders)  # every worker can still take every run
        firsts = [o[0] for o in orders[: min(count, 6)]]
        assert len(set(firsts)) == len(firsts)  # and the workers start on different models
        for o in orders:  # a model's seeds stay together
            models = [n.rsplit("-", 1)[0] for n in o]
            assert all(models[i] == models[i + 1] for i in range(0, len(models), 2))


def test_workers_get_disjoint_cores_and_share_them_round_robin_when_there_are_more_workers():
    assert workers.core_sets(2, [0, 1]) == [[0], [1]]
    assert workers.core_sets(2, [4, 5, 6, 7]) == [[4, 5], [6, 7]]
    assert workers.core_sets(3, [0, 1, 2, 3]) == [[0], [1], [2, 3]]
    assert workers.core_sets(3, [0, 1]) == [[0], [1], [0]]
    assert sum(workers.core_sets(4), []) and all(workers.core_sets(4))  # this machine: never an empty set


def _fake_trainer(monkeypatch, trained, loss=lambda r: 3.0, pause=0.0):
    def fake_train(planned, progress, lead):
        trained.append(planned.name)
        time.sleep(pause)
        rd.write_status(planned.config.run_dir, "done", step=1, total_steps=1)
        rd.write_final(planned.config.run_dir, {"val_loss": loss(planned), "params": planned.row["params"]})
        return "done", ""

    monkeypatch.setattr(driver, "_train", fake_train)


def _located(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", AXES))
    return driver.prepare(grid, build_plan(grid), tmp_path / "sweep")


@pytest.mark.parametrize("holder_finishes", [True, False])
def test_a_waiting_worker_waits_for_a_held_run_and_trains_it_only_if_its_holder_left_it_unfinished(
        tmp_path, monkeypatch, holder_finishes):
    runs = _located(tmp_path)
    trained = []
    _fake_trainer(monkeypatch, trained)
    held = runs[1]
    lock = FileLock.acquire(run_lock_path(held.config.run_dir), heartbeat_s=0.05)  # another live driver (this pid)
    result = {}
    opts = driver.Options(progress=False, worker=(0, 1), heartbeat_s=0.05)
    t = threading.Thread(target=lambda: result.update(summary=driver.run_sweep(runs, tmp_path / "sweep", opts)))
    t.start()
    deadline = time.time() + 30
    while len(trained) < len(runs) - 1 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert t.is_alive(), "a worker must wait for the run another driver holds, not leave it"
    assert held.name not in trained and len(trained) == len(runs) - 1
    if holder_finishes:
        rd.write_status(held.config.run_dir, "done", step=1, total_steps=1)
        rd.write_final(held.config.run_dir, {"val_loss": 3.0, "params": held.row["params"]})
    lock.release()
    t.join(timeout=30)
    assert not t.is_alive()
    assert (held.name in trained) is not holder_finishes
    counts = result["summary"].counts
    assert driver.HELD not in counts and result["summary"].held == []
    assert counts.get("done") == len(runs) - holder_finishes
    assert counts.get("skipped (already done)", 0) == holder_finishes


def test_without_waiting_a_driver_leaves_a_held_run_to_its_holder(tmp_path, monkeypatch):
    runs = _located(tmp_path)
    trained = []
    _fake_trainer(monkeypatch, trained)
    lock = FileLock.acquire(run_lock_path(runs[0].config.run_dir), heartbeat_s=0.05)
    try:
        summary = driver.run_sweep(runs, tmp_path / "sweep", driver.Options(progress=False, heartbeat_s=0.05))
    finally:
        lock.release()
    assert summary.counts == {"skipped (held by another driver)": 1, "done": len(runs) - 1}
    assert runs[0].name not in trained


def test_two_workers_share_a_tuned_sweep_each_run_trained_once(tmp_path, monkeypatch):
    """Two waiting drivers over one tuned plan (threads of this process: the locks see two live holders)."""
    trained = []

    def bowl(r):
        best = 2e-3 if r.row["is_uniform"] else 8e-3
        return 3.0 + 0.1 * math.log(r.row["tune_value"] / best) ** 2 + 0.001 * r.row["seed"]

    _fake_trainer(monkeypatch, trained, loss=bowl, pause=0.02)
    path = write_grid(tmp_path / "g.yaml", AXES, tune={"axis": "optimizer.lr", "values": [1e-3, 2e-3, 4e-3],
                                                        "seeds": [100]})
    out = tmp_path / "sweep"
    argv = [str(path), "--out", str(out), "--no-report", "--worker"]
    codes = []
    threads = [threading.Thread(target=lambda i=i: codes.append(run.main(argv + [f"{i}/2"]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert codes == [0, 0]
    df = read_results(out)
    # the arm's optimum (8e-3) is past the range: two extensions up (8e-3, then 1.6e-2 to see it is a minimum),
    # each planned by whichever worker saw the edge first and trained by one of them
    assert len(df) == 3 + 2 + 3 + 4 and (df["status"] == "done").all()
    assert sorted(trained) == sorted(df["run"]) and len(set(trained)) == len(trained)
    main = df[df["role"] == "main"]
    assert sorted(main["tune_value"].unique()) == [2e-3, 8e-3]


def test_jobs_refuses_nonsense():
    assert run.main(["sweeps/grids/quickstart.yaml", "--jobs", "0"]) == 2
    assert run.main(["sweeps/grids/quickstart.yaml", "--jobs", "2", "--preflight"]) == 2


def test_jobs_2_trains_every_run_once_and_a_tiny_grid_to_the_bits_of_one_driver(tmp_path):
    """Real training in two pinned worker processes against one ordinary driver (all threads). Models this
    small have no matmul that XLA splits across threads, so the bits must match: a worker that trained a
    different config, seed or data would not."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 12}}
    path = write_grid(tmp_path / "g.yaml", AXES, base=base)
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "sweeps.run", str(path), "--no-progress", "--no-report", "--out"]
    for out, extra in ((one, []), (two, ["--jobs", "2"])):
        proc = subprocess.run(cmd + [str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = proc.stdout
    a, b = read_results(one).set_index("run"), read_results(two).set_index("run")
    assert len(a) == len(b) == 4 and (b["status"] == "done").all()
    assert (a["val_loss"] == b["val_loss"]).all(), "a worker must train to the same bits as the driver"
    starts = [line for line in printed.splitlines() if ": training (" in line]
    assert sorted(line.split("] ")[1].split(":")[0] for line in starts) == sorted(b.index)  # each run once
    assert {line[:3] for line in starts} == {"w0|", "w1|"}  # and both workers trained
    assert "training steps" in printed  # the parent's end-of-sweep summary


def test_sigterm_to_the_parent_stops_every_worker_at_a_checkpoint_and_a_rerun_finishes(tmp_path):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 400, "eval_every": 200},
            "checkpoint": {"every": 20, "keep": 2}}
    path = write_grid(tmp_path / "g.yaml", AXES, base=base)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sweeps.run", str(path), "--no-progress", "--no-report", "--jobs", "2",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # wait until both workers train
        seen.append(line)
        if sum(": training (" in x for x in seen) >= 2:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, "".join(seen) + rest
    states = [rd.read_status(d)["state"] for d in (out / "runs").iterdir()]
    assert "running" not in states and states.count("pending") >= 1  # stopped runs wait, resumable
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    df = read_results(out)
    assert len(df) == 4 and (df["status"] == "done").all() and (df["final_step"] == 400).all()
