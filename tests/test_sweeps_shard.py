"""Sharding: every run in exactly one shard, from flags, SLURM or Kubernetes."""

import pytest

from sweeps.shard import Shard, ShardError, detect_shard, parse_shard


@pytest.mark.parametrize("count", [1, 2, 3, 7, 30])
def test_shards_partition_the_plan(count):
    items = [f"run{i}" for i in range(23)]
    parts = [Shard(i, count, "test").select(items) for i in range(count)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    assert sum(len(p) for p in parts) == len(items)  # disjoint
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def test_flag_wins_and_is_validated():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert detect_shard("1/2", env=env) == Shard(1, 2, "--shard")
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(ShardError):
            parse_shard(bad)


def test_slurm_array_with_offset_and_step():
    assert detect_shard(env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(2, 4, "SLURM_ARRAY_TASK_ID")
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_STEP": "2"}  # --array=1-7:2 -> ids 1,3,5,7
    assert detect_shard(env=env).index == 2
    with pytest.raises(ShardError, match="SLURM_ARRAY_TASK_COUNT"):
        detect_shard(env={"SLURM_ARRAY_TASK_ID": "0"})


def test_kubernetes_indexed_job():
    assert detect_shard(env={"JOB_COMPLETION_INDEX": "3", "ELMJAX_SHARD_COUNT": "5"}) == Shard(3, 5, "JOB_COMPLETION_INDEX")
    assert detect_shard(count=8, env={"JOB_COMPLETION_INDEX": "7"}) == Shard(7, 8, "JOB_COMPLETION_INDEX")
    with pytest.raises(ShardError, match="ELMJAX_SHARD_COUNT"):
        detect_shard(env={"JOB_COMPLETION_INDEX": "3"})
    with pytest.raises(ShardError):
        detect_shard(count=3, env={"JOB_COMPLETION_INDEX": "3"})  # index out of range


def test_no_shard_without_flags_or_environment():
    assert detect_shard(env={}) is None
    with pytest.raises(ShardError, match="needs a task index"):
        detect_shard(count=4, env={})
