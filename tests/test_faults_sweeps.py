"""Sweep faults end to end: lock settings that would disable mutual exclusion, stale locks left by kills."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sweeps import run
from sweeps.locks import FileLock, is_stale, read_lock
from sweep_helpers import TINY_BASE, write_grid


def _driver(grid, out, *flags):
    return subprocess.Popen([sys.executable, "-m", "sweeps.run", str(grid), "--out", str(out), "--no-progress",
                             "--no-report", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "9"])
def test_two_drivers_racing_with_a_lock_timeout_that_disables_locking_are_both_refused(tmp_path, timeout):
    """--lock-timeout 0 used to make every lock stale at once: both drivers trained every run."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 4}, "compilation_cache": ""}
    grid = write_grid(tmp_path / "race.yaml", {"seed": [0, 1]}, base=base)
    out = tmp_path / "sweep"
    drivers = [_driver(grid, out, "--lock-timeout", timeout) for _ in range(2)]
    results = [d.communicate(timeout=120) for d in drivers]
    for d, (stdout, stderr) in zip(drivers, results):
        assert d.returncode == 2, stdout + stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --lock-timeout: must be at least 10 seconds"), stderr
        assert "training" not in stdout
    assert not out.exists()  # refused before anything was written


def test_a_live_holder_on_this_host_is_never_stale_however_old_its_lock(tmp_path):
    """A stalled heartbeat (or a short timeout) must not let a second driver take a run that is still training."""
    path = tmp_path / ".sweep.lock"
    code = ("import time; from sweeps.locks import FileLock; "
            f"l = FileLock.acquire({str(path)!r}, heartbeat_s=0); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        old = time.time() - 10_000
        os.utime(path, (old, old))
        assert not is_stale(path, stale_after_s=10)
        assert FileLock.acquire(path, stale_after_s=10, heartbeat_s=0) is None
        assert read_lock(path)["pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert is_stale(path, stale_after_s=1e9)  # its process is gone: stale at once, whatever the timeout


ONE_RUN = {**TINY_BASE, "model": {**TINY_BASE["model"], "model_dim": 32, "qkv_multipliers": 1.0, "ffn_multipliers": 2.0},
           "train": {**TINY_BASE["train"], "steps": 4}, "checkpoint": {"every": 2, "keep": 1}}


def _killed_holder(lock_path) -> int:
    """A driver process that took ``lock_path`` and was SIGKILLed before it could release it; its pid."""
    code = ("from sweeps.locks import FileLock; "
            f"l = FileLock.acquire({str(lock_path)!r}, heartbeat_s=0); print('held', flush=True); input()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    child.send_signal(signal.SIGKILL)
    child.wait()
    return child.pid


def test_a_stale_lock_left_in_a_done_run_by_a_killed_driver_is_removed_by_the_next_pass(tmp_path, capsys):
    from elmjax import run_dir as rd
    from sweeps.locks import LOCK_NAME
    from sweeps.status import status_rows

    grid = write_grid(tmp_path / "stale.yaml", {"seed": [0]}, base={**ONE_RUN, "compilation_cache": str(tmp_path / "xla")})
    out = tmp_path / "sweep"
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 0
    (run_dir,) = (out / "runs").iterdir()
    lock_path = run_dir / LOCK_NAME
    assert rd.read_status(run_dir)["state"] == "done"
    assert not lock_path.exists()  # a normal finish releases its lock
    metrics = (run_dir / "metrics.jsonl").read_text()

    def leave(kind):
        """A driver killed after the run was done but before it released the lock."""
        if kind == "dead pid on this host":
            dead = _killed_holder(lock_path)
            assert read_lock(lock_path)["pid"] == dead
        else:  # a driver on another host that stopped heart-beating an hour ago
            lock_path.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "token": "t", "created": 0}))
            os.utime(lock_path, (time.time() - 3600, time.time() - 3600))

    for kind in ("dead pid on this host", "another host, no heartbeat for an hour"):
        leave(kind)
        capsys.readouterr()
        assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 0
        assert ": already done" in capsys.readouterr().out
        assert not list(run_dir.glob(".sweep.lock*")), f"{kind}: the next pass must remove a done run's stale lock"
        assert (run_dir / "metrics.jsonl").read_text() == metrics  # not retrained
        assert [row["where"] for row in status_rows(out)] == [""]


def test_the_lock_of_a_live_driver_in_a_done_run_is_left_alone(tmp_path):
    """Clearing stale locks must never remove a live holder's (e.g. a driver scoring the run right now)."""
    from elmjax import run_dir as rd
    from sweeps.driver import Options, _decide
    from sweeps.grid import load_grid
    from sweeps.locks import LOCK_NAME
    from sweeps.plan import build_plan

    grid = write_grid(tmp_path / "live.yaml", {"seed": [0]}, base=ONE_RUN)
    planned = build_plan(load_grid(grid))[0]
    run_dir = tmp_path / "run"
    rd.write_status(run_dir, "done")
    lock = FileLock.acquire(run_dir / LOCK_NAME, heartbeat_s=0)
    try:
        cfg = planned.config.replace(run_dir=str(run_dir))
        code, taken = _decide(dataclasses.replace(planned, config=cfg), Options())
        assert taken is None and read_lock(run_dir / LOCK_NAME)["token"] == lock.token
    finally:
        lock.release()


def test_a_live_pid_that_cannot_be_told_from_a_reused_one_still_goes_stale_by_age(tmp_path):
    """Without a recorded start time (no /proc) a live pid may be an unrelated process: the timeout applies."""
    import socket

    path = tmp_path / ".sweep.lock"
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": None, "token": "t"}))
    assert not is_stale(path, stale_after_s=60)
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert is_stale(path, stale_after_s=60)


def test_a_torn_status_json_stops_the_driver_with_a_one_line_error(tmp_path, capsys, monkeypatch):
    from sweeps.driver import Summary
    from sweeps.grid import load_grid
    from sweeps.plan import build_plan

    grid = write_grid(tmp_path / "torn.yaml", {"seed": [0, 1]}, base=ONE_RUN)
    out = tmp_path / "sweep"
    with monkeypatch.context() as m:  # lay the sweep out without training
        m.setattr(run, "run_sweep", lambda *a, **k: Summary())
        assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 0
    status = out / "runs" / build_plan(load_grid(grid))[1].name / "status.json"
    status.write_text('{"state": "runn')  # damaged outside the sweep (a copy taken mid-write)
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {status}: not valid JSON"), err
    assert "delete it and rerun" in err
    assert not list(out.glob("runs/*/metrics.jsonl"))  # nothing trained
