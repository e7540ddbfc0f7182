"""Sweep faults end to end: lock settings that would disable mutual exclusion, stale locks left by kills."""

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
