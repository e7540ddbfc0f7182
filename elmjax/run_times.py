"""Where a run's wall time goes: compiling, training steps, evaluation, checkpoints, the rest.

``RunTimes`` charges wall-clock time to one part at a time: the innermost
``measure(part)`` block that is open (an eval inside the step loop pauses
the loop's ``train`` time). Time outside every block is ``other_s`` (start-up,
opening the data, writing logs), so the parts always sum to ``wall_time_s``.
A resumed run adds the times its checkpoint recorded, like ``wall_time_s``.
Pure Python: sweeps and analysis read these keys without JAX.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

PARTS = ("compile", "train", "eval", "checkpoint")
TIME_KEYS = tuple(f"{p}_s" for p in PARTS) + ("other_s",)  # final.json keys, besides wall_time_s


class RunTimes:
    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._t0 = clock()
        self._spent = dict.fromkeys(PARTS, 0.0)
        self._prev = dict.fromkeys(TIME_KEYS + ("wall_time_s",), 0.0)
        self._active: str | None = None
        self._since = self._t0

    def resume(self, saved: dict) -> None:
        """Add the times of the attempts before this one (a checkpoint's record).

        Checkpoints of older versions hold only ``wall_time_s``: their time is
        counted as ``other_s``, so the parts still sum to the wall time."""
        wall = float(saved.get("wall_time_s", 0.0))
        parts = {k: float(saved.get(k, 0.0)) for k in TIME_KEYS[:-1]}
        self._prev = {**parts, "other_s": wall - sum(parts.values()), "wall_time_s": wall}

    def _switch(self, part: str | None) -> str | None:
        now = self._clock()
        if self._active is not None:
            self._spent[self._active] += now - self._since
        outer, self._active, self._since = self._active, part, now
        return outer

    @contextmanager
    def measure(self, part: str):
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; one of {PARTS}")
        outer = self._switch(part)
        try:
            yield
        finally:
            self._switch(outer)

    def record(self) -> dict:
        """``wall_time_s`` and its parts (``TIME_KEYS``), all attempts together."""
        now = self._clock()
        spent = dict(self._spent)
        if self._active is not None:
            spent[self._active] += now - self._since
        wall = now - self._t0
        out = {"wall_time_s": self._prev["wall_time_s"] + wall}
        for p in PARTS:
            out[f"{p}_s"] = self._prev[f"{p}_s"] + spent[p]
        out["other_s"] = self._prev["other_s"] + wall - sum(spent.values())
        return out


def train_share(record: dict) -> float | None:
    """The fraction of wall time spent in training steps (None if not recorded)."""
    wall, train = record.get("wall_time_s"), record.get("train_s")
    if wall is None or train is None or not wall > 0:
        return None
    return train / wall
