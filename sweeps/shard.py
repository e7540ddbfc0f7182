"""Split a plan over the tasks of an array job, deterministically.

Task ``I`` of ``N`` takes runs ``I, I+N, I+2N, ...`` of the plan (the plan's
order is fixed by the grid file), so every run belongs to exactly one task
and arms and their twins land on different tasks. Where the task index
comes from, first match wins:

1. ``--shard I/N``;
2. SLURM job arrays: ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT``
   (and ``SLURM_ARRAY_TASK_MIN`` / ``SLURM_ARRAY_TASK_STEP``, so ``--array=1-8``
   works too);
3. Kubernetes Indexed Jobs: ``JOB_COMPLETION_INDEX`` with the count from
   ``--shards N`` or the ``ELMJAX_SHARD_COUNT`` environment variable (set it
   to the Job's ``completions``).

Shards share the sweep directory, so per-run locks still keep two tasks
from ever training the same run (e.g. after a scheduler retries a task).
Pure Python.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

T = TypeVar("T")
COUNT_ENV = "ELMJAX_SHARD_COUNT"


class ShardError(ValueError):
    pass


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # where index and count came from, for the log

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"shard {self.index}/{self.count} ({self.source}): need 0 <= index < count")

    def select(self, items: Sequence[T]) -> list[T]:
        return [x for i, x in enumerate(items) if i % self.count == self.index]

    def __str__(self) -> str:
        return f"shard {self.index}/{self.count} (from {self.source})"


def parse_shard(text: str) -> Shard:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ShardError(f"--shard {text!r}: expected I/N, e.g. 0/4 (task index I of N, counted from 0)")
    return Shard(int(m.group(1)), int(m.group(2)), "--shard")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ShardError(f"environment variable {name}={value!r} is not an integer") from None


def detect_shard(flag: str | None = None, count: int | None = None, env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard this process runs, or None to run the whole plan."""
    env = os.environ if env is None else env
    if flag is not None:
        return parse_shard(flag)
    task_id = _int_env(env, "SLURM_ARRAY_TASK_ID")
    if task_id is not None:
        total = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        if total is None:
            raise ShardError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shard I/N")
        if count is not None and count != total:
            raise ShardError(f"--shards {count} disagrees with SLURM_ARRAY_TASK_COUNT={total}")
        first = _int_env(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int_env(env, "SLURM_ARRAY_TASK_STEP") or 1
        return Shard((task_id - first) // step, total, "SLURM_ARRAY_TASK_ID")
    index = _int_env(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        total = count if count is not None else _int_env(env, COUNT_ENV)
        if total is None:
            raise ShardError(f"JOB_COMPLETION_INDEX is set but the shard count is not: pass --shards N "
                             f"or set {COUNT_ENV} (the Job's completions)")
        return Shard(index, total, "JOB_COMPLETION_INDEX")
    if count is not None:
        raise ShardError("--shards N needs a task index: --shard I/N, SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX")
    return None
