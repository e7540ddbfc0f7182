"""Per-run locks: exclusive, heartbeat, stale takeover, and no double winner under contention."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

from sweeps.locks import FileLock, holder, is_stale, read_lock


def test_lock_is_exclusive_until_released(tmp_path):
    path = tmp_path / "run" / ".sweep.lock"
    lock = FileLock.acquire(path, heartbeat_s=0)
    assert lock is not None and read_lock(path)["pid"] == os.getpid()
    assert FileLock.acquire(path, heartbeat_s=0) is None  # our own live process holds it
    assert holder(path.parent)["token"] == lock.token
    lock.release()
    assert not path.exists()
    with FileLock.acquire(path, heartbeat_s=0) as again:
        assert again is not None
    assert not path.exists()


def test_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    path = tmp_path / ".sweep.lock"
    code = ("import sys, time; from sweeps.locks import FileLock; "
            f"l = FileLock.acquire({str(path)!r}, heartbeat_s=0); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    assert FileLock.acquire(path, heartbeat_s=0) is None  # alive: busy
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert is_stale(path)  # dead pid on this host: stale without waiting for the timeout
    lock = FileLock.acquire(path, heartbeat_s=0)
    assert lock is not None and read_lock(path)["pid"] == os.getpid()
    lock.release()


def test_lock_from_another_host_is_stale_only_after_the_timeout(tmp_path):
    path = tmp_path / ".sweep.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "t"}))
    assert FileLock.acquire(path, stale_after_s=60, heartbeat_s=0) is None
    old = time.time() - 120
    os.utime(path, (old, old))
    lock = FileLock.acquire(path, stale_after_s=60, heartbeat_s=0)
    assert lock is not None and read_lock(path)["token"] == lock.token
    lock.release()


def test_heartbeat_keeps_the_lock_fresh_and_notices_when_it_is_broken(tmp_path):
    path = tmp_path / ".sweep.lock"
    lock = FileLock.acquire(path, heartbeat_s=0.05)
    old = time.time() - 1000
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5  # touched again
    assert not lock.lost
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "someone else"}))
    time.sleep(0.3)
    assert lock.lost
    lock.release()
    assert read_lock(path)["token"] == "someone else"  # release never removes another holder's lock


def _contend(path, barrier, results, stale_after):
    barrier.wait()
    lock = FileLock.acquire(path, stale_after_s=stale_after, heartbeat_s=0)
    results.put(lock is not None)
    if lock is not None:
        time.sleep(0.5)  # hold it while the others try
        lock.release()


def test_exactly_one_of_many_contenders_wins_even_for_a_stale_lock(tmp_path):
    ctx = mp.get_context("spawn")
    for stale in (False, True):
        path = tmp_path / f"stale{stale}.lock"
        if stale:  # everyone sees the same stale lock and tries to break it
            path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "old"}))
            os.utime(path, (time.time() - 1000, time.time() - 1000))
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(path), barrier, results, 100.0)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        wins = [results.get(timeout=10) for _ in procs]
        assert sum(wins) == 1, f"stale={stale}: {sum(wins)} winners"
