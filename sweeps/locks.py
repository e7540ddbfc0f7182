"""Atomic file locks so that two drivers never train the same run at once.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local disks
and NFSv3+) holding ``{"pid", "host", "start", "token", "created"}``. While
held, a heartbeat thread touches it every ``heartbeat_s`` seconds. A lock is
*stale*, and may be taken over, when

* its holder ran on this host and that process is gone (SIGKILL, OOM
  killer, a crashed node's reboot), which is noticed at once; or
* its holder ran on another host and it has not been touched for
  ``stale_after_s`` seconds (that host died or lost the file system).

A holder on this host whose process is alive (the same process: pid and
start time match) is never stale, however old its lock: liveness is known
for certain there, and a stalled heartbeat must not let a second driver
train the same run. Without /proc (no start time) the age rule applies too.

Taking over goes through a second ``O_EXCL`` file (``<lock>.break``) and
re-checks that the lock is still the same stale file, so two drivers that
both see a stale lock cannot both win. The window that remains (a holder
that was silent for ``stale_after_s`` and wakes up exactly while its lock is
broken) is why the timeout should be many heartbeats long.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

LOCK_NAME = ".sweep.lock"
STALE_AFTER_S = 600.0
MIN_STALE_AFTER_S = 10.0  # below this, a busy host's late heartbeat would look like a dead holder
HEARTBEAT_S = 30.0


def _start_time(pid: int) -> str | None:
    """The process start time (Linux /proc), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return start is None or now is None or now == start


def read_lock(path: str | Path) -> dict | None:
    """The holder recorded in a lock file; {} if unreadable (being written), None if absent."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def is_stale(path: str | Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    """True if the lock at ``path`` exists but its holder is gone (see the module docstring)."""
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    info = read_lock(path) or {}
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if not _alive(info["pid"], info.get("start")):
            return True
        if info.get("start") is not None and _start_time(info["pid"]) is not None:
            return False  # the very process that took the lock is running
    return age > stale_after_s  # another host, or a live pid we cannot tell from a reused one (no /proc)


class FileLock:
    """One held lock; create with ``FileLock.acquire``. Also a context manager that releases."""

    def __init__(self, path: Path, token: str, heartbeat_s: float):
        self.path, self.token = path, token
        self.lost = False  # set if someone broke our lock (we were silent for too long)
        self._stop = threading.Event()
        self._thread = None
        if heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                            name=f"lock-heartbeat:{path}")
            self._thread.start()

    @classmethod
    def acquire(cls, path: str | Path, *, stale_after_s: float = STALE_AFTER_S,
                heartbeat_s: float = HEARTBEAT_S) -> "FileLock | None":
        """The lock, or None if a live holder has it. Never blocks."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # second try after breaking a stale lock
            token = uuid.uuid4().hex
            if _create(path, token):
                return cls(path, token, heartbeat_s)
            if not (is_stale(path, stale_after_s) and _break(path, stale_after_s)):
                return None
        return None

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if (read_lock(self.path) or {}).get("token") != self.token:
                self.lost = True
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (read_lock(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _create(path: Path, token: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "token": token, "created": time.time()}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
        f.flush()
        os.fsync(f.fileno())
    return True


def _break(path: Path, stale_after_s: float) -> bool:
    """Remove the stale lock at ``path`` if we are the one breaker and it is still the same file."""
    try:
        observed = path.stat()
    except FileNotFoundError:
        return True
    breaker = path.with_name(path.name + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:  # a breaker that died mid-break must not block everyone forever
            if time.time() - breaker.stat().st_mtime > stale_after_s:
                breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    try:
        try:
            now = path.stat()
        except FileNotFoundError:
            return True
        if (now.st_ino, now.st_mtime_ns) != (observed.st_ino, observed.st_mtime_ns) or not is_stale(path, stale_after_s):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        breaker.unlink(missing_ok=True)


def clear_stale(path: str | Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Remove the lock at ``path`` if its holder is gone; True if it was removed.

    A driver killed between finishing a run and releasing its lock leaves the
    lock in a finished run, which nothing would otherwise ever take again."""
    path = Path(path)
    return is_stale(path, stale_after_s) and _break(path, stale_after_s)


def run_lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def holder(run_dir: str | Path, stale_after_s: float = STALE_AFTER_S) -> dict | None:
    """Who holds a run's lock right now ({'host', 'pid', ...}), or None if nobody live does."""
    path = run_lock_path(run_dir)
    info = read_lock(path)
    if info is None or is_stale(path, stale_after_s):
        return None
    return info
