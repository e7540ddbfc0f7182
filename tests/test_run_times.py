"""RunTimes: wall time charged to one part at a time, accumulated across resumes."""

import pytest

from elmjax.run_times import TIME_KEYS, RunTimes, train_share


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_nested_parts_pause_the_outer_one_and_the_rest_is_other():
    clock = Clock()
    times = RunTimes(clock)
    clock.t += 1  # start-up: other
    with times.measure("compile"):
        clock.t += 2
    with times.measure("train"):
        clock.t += 3
        with times.measure("eval"):
            clock.t += 4
        with times.measure("checkpoint"):
            clock.t += 5
        clock.t += 6
    clock.t += 7  # after the loop: other
    r = times.record()
    assert r == {"wall_time_s": 28, "compile_s": 2, "train_s": 9, "eval_s": 4, "checkpoint_s": 5, "other_s": 8}
    assert train_share(r) == pytest.approx(9 / 28)


def test_record_inside_a_part_counts_it_so_far():
    clock = Clock()
    times = RunTimes(clock)
    with times.measure("train"):
        clock.t += 3
        assert times.record()["train_s"] == 3
        clock.t += 1
    assert times.record()["train_s"] == 4


def test_resume_adds_the_earlier_attempts():
    clock = Clock()
    times = RunTimes(clock)
    times.resume({"wall_time_s": 10, "compile_s": 1, "train_s": 6, "eval_s": 1, "checkpoint_s": 1, "other_s": 1})
    with times.measure("train"):
        clock.t += 5
    r = times.record()
    assert r["wall_time_s"] == 15 and r["train_s"] == 11 and r["compile_s"] == 1
    assert sum(r[k] for k in TIME_KEYS) == r["wall_time_s"]


def test_a_checkpoint_with_only_wall_time_counts_it_as_other():
    times = RunTimes(Clock())
    times.resume({"wall_time_s": 10.0, "iterator": {}})
    r = times.record()
    assert r["other_s"] == 10 and r["train_s"] == 0 and r["wall_time_s"] == 10


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown part"):
        with RunTimes().measure("sleep"):
            pass
