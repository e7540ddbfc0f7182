"""TensorBoard scalars that match metrics.jsonl after kills and resumes.

The training loop flushes the event file with every metrics line, so a kill
loses what metrics.jsonl loses (nothing it kept). On resume from step N the
existing event files are rewritten into one holding only the points up to N,
as ``MetricsLog`` drops rows past N, so every (tag, step) is written once.
Optional: without tensorboardX there is no ``tb/``.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path

_PATTERN = "events.out.tfevents.*"


def _records(path: Path):
    """The records of a TFRecord file; a torn last record (a kill) ends it."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)  # uint64 length + uint32 masked CRC of the length
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def read_events(tb_dir: str | Path) -> list:
    """Every complete event of every event file in ``tb_dir``, file by file."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(Path(tb_dir).glob(_PATTERN)):
        for data in _records(path):
            out.append(Event.FromString(data))
    return out


def scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] in file order, duplicates kept (for checks)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for e in read_events(tb_dir):
        for v in e.summary.value:
            out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def _truncate(tb_dir: Path, last_step: int) -> None:
    """Rewrite the event files as one holding only summaries up to ``last_step``."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import RecordWriter

    old = sorted(tb_dir.glob(_PATTERN))
    if not old:
        return
    keep, seen = [], set()
    for e in read_events(tb_dir):
        key = (e.step, tuple(v.tag for v in e.summary.value))
        # Duplicates only come from a kill during an earlier rewrite.
        if e.HasField("summary") and e.step <= last_step and key not in seen:
            seen.add(key)
            keep.append(e)
    name = tb_dir / f"events.out.tfevents.{int(time.time())}.resumed-{last_step}"
    tmp = tb_dir / f".{name.name}.tmp"
    writer = RecordWriter(str(tmp))
    writer.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
    for e in keep:
        writer.write(e.SerializeToString())
    writer.flush()
    writer.close()
    os.replace(tmp, name)
    for p in old:  # the new file holds all they had up to last_step
        p.unlink()


class ScalarWriter:
    """Scalars written straight to an event file, in the caller's thread.

    tensorboardX's SummaryWriter queues events for a background thread, and
    its flush() does not drain that queue, so a kill loses recent points."""

    def __init__(self, tb_dir: Path):
        from tensorboardX.event_file_writer import EventsWriter

        # The pid keeps this file's name apart from a rewritten file of the same second.
        self._writer = EventsWriter(str(tb_dir / "events"), f".{os.getpid()}")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self._writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(tag, value)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _import_tensorboardx() -> None:
    """Import tensorboardX without the PyTorch it imports when installed (its SummaryWriter accepts torch
    tensors; nothing here uses them). That import alone took 1.6 s of each run's start-up in a sweep worker.
    Python's documented way to refuse a module: ``sys.modules[name] = None`` makes importing it fail, and
    tensorboardX falls back to numpy. Left alone when PyTorch is already imported."""
    refuse = "torch" not in sys.modules
    if refuse:
        sys.modules["torch"] = None
    try:
        import tensorboardX  # noqa: F401
    finally:
        if refuse and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def open_writer(run_dir: str | Path, resume_step: int = 0) -> ScalarWriter | None:
    """A writer on ``run_dir/tb`` holding the points up to ``resume_step``; None without tensorboardX."""
    try:
        _import_tensorboardx()
    except ImportError:  # optional at run time
        return None
    tb_dir = Path(run_dir) / "tb"
    tb_dir.mkdir(parents=True, exist_ok=True)
    _truncate(tb_dir, resume_step)
    return ScalarWriter(tb_dir)
