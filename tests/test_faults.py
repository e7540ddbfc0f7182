"""End-to-end faults on tiny runs: kills, damaged checkpoints, bad checkpoint settings.

Each test reproduces a fault of issue 10 and checks that the rerun gives what
an uninterrupted run gives."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from elmjax import run_dir as rd, tb_log
from elmjax.checkpoint import CheckpointError, load_model
from elmjax.config_io import ConfigError
from elmjax.run_times import TIME_KEYS
from elmjax.train import run
from train_helpers import tiny_config

TIMING = ("time", "tokens_per_s", "mfu")  # fields that may differ between two identical runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 20-step run (checkpoints 10, 15, 20)."""
    d = tmp_path_factory.mktemp("faults") / "ref"
    status_steps.clear()
    run(tiny_config(d), progress_callback=lambda step, total, row: status_steps.append((step, rd.read_status(d)["step"])))
    return d


status_steps: list = []  # (logged step, status.json's step then), from the reference run


def _copy(reference, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    return d, tiny_config(d)


def _killed_before_done(d):
    """What a kill after the last checkpoint but before final.json leaves."""
    (d / "final.json").unlink()
    rd.write_status(d, "running", total_steps=20)


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_same_params(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _without(row, keys):
    return {k: v for k, v in row.items() if k not in keys}


def _assert_same_record(d, reference):
    """final.json and metrics.jsonl as the uninterrupted run wrote them."""
    assert rd.read_status(d)["state"] == "done"
    wall = ("wall_time_s",) + TIME_KEYS
    assert _without(rd.read_final(d), wall) == _without(rd.read_final(reference), wall)
    got = [_without(r, TIMING) for r in rd.read_metrics(d)]
    want = [_without(r, TIMING) for r in rd.read_metrics(reference)]
    assert got == want


def _flip_a_bit(step_dir):
    # The middle of the largest array file: raw float data, so without a
    # checksum the flip restores silently as a slightly different parameter.
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))


def _truncate(step_dir):
    for p in (step_dir / "state").rglob("*"):
        if p.is_file() and p.stat().st_size > 0:
            p.write_bytes(b"\0" * 7)


def test_kill_after_the_final_checkpoint_reruns_to_the_same_record(tmp_path, reference):
    d, cfg = _copy(reference, tmp_path)
    _killed_before_done(d)
    result = run(cfg)
    assert result.state == "done"
    assert result.final["train_loss"] == rd.read_final(reference)["train_loss"] is not None
    _assert_same_record(d, reference)
    tb = tb_log.scalars(d / "tb")
    assert [s for s, _ in tb["eval/val_loss"]] == [10, 20]


@pytest.mark.parametrize("override, message", [
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
    ("checkpoint.every=0", "checkpoint.every must be >= 1"),
])
def test_checkpoint_settings_that_lose_the_model_are_refused_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path / "r", override)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  steps: 3\ncheckpoint:\n  {override.split('.')[1].replace('=', ': ')}\n")
    out = subprocess.run([sys.executable, "-m", "elmjax.train", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_unreadable_final_checkpoint_is_replaced_by_the_rerun(tmp_path, reference, caplog):
    d, cfg = _copy(reference, tmp_path)
    _killed_before_done(d)
    _truncate(d / "checkpoints" / "20")
    with caplog.at_level(logging.WARNING):
        run(cfg)
    assert "replacing unreadable checkpoint step 20" in caplog.text
    model = load_model(d)  # would refuse if step 20 were still unreadable
    assert model.checkpoint_step == 20
    _assert_same_params(model, load_model(reference))
    _assert_same_record(d, reference)


def test_load_model_refuses_a_run_whose_newest_checkpoint_is_unreadable(tmp_path, reference, caplog):
    d, _ = _copy(reference, tmp_path)
    _truncate(d / "checkpoints" / "20")
    with pytest.raises(CheckpointError, match=r"newest checkpoint \(step 20\) is unreadable.*readable one is step 15"):
        load_model(d)
    with caplog.at_level(logging.WARNING):
        older = load_model(d, allow_older=True)
    assert older.checkpoint_step == 15
    assert "loading step 15" in caplog.text


def test_bit_flip_is_caught_by_the_checksum_and_the_run_falls_back(tmp_path, reference, caplog):
    d, cfg = _copy(reference, tmp_path)
    # Killed after step 15's checkpoint; then a bit of it flips on disk.
    shutil.rmtree(d / "checkpoints" / "20")
    _killed_before_done(d)
    _flip_a_bit(d / "checkpoints" / "15")
    with caplog.at_level(logging.WARNING):
        result = run(cfg)
    assert "step 15" in caplog.text and "does not match its checksum" in caplog.text
    assert result.state == "done"
    _assert_same_params(load_model(d), load_model(reference))
    _assert_same_record(d, reference)


def test_status_reports_the_step_while_the_run_goes(reference):
    assert status_steps == [(s, s) for s in range(2, 21, 2)]


_KILL_AT = """
import os, signal, sys
sys.path.insert(0, "tests")
from train_helpers import tiny_config
from elmjax.train import run

def kill(step, total, row):
    if step == int(sys.argv[2]):  # a SIGKILL at a known point: no cleanup, no flush
        os.kill(os.getpid(), signal.SIGKILL)

run(tiny_config(sys.argv[1]), progress_callback=kill)
"""


def test_sigkill_then_resume_gives_the_same_metrics_and_tensorboard(tmp_path, reference):
    d = tmp_path / "run"
    # Killed between checkpoints (10 saved, maybe still being written), with
    # train rows logged past it.
    out = subprocess.run([sys.executable, "-c", _KILL_AT, str(d), "14"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert rd.read_status(d)["state"] == "running"
    assert max(r["step"] for r in rd.read_metrics(d)) == 14
    # The checkpoint the rerun resumes from (10 may still have been in the middle of its async save).
    latest = max((p for p in (d / "checkpoints").iterdir() if p.name.isdigit() and (p / "data" / "metadata").exists()),
                 key=lambda p: int(p.name))
    saved = json.loads((latest / "data" / "metadata").read_text())["times"]
    run(tiny_config(d))
    _assert_same_record(d, reference)
    # The times of the killed attempt (up to its checkpoint) carry over, like wall_time_s.
    final = rd.read_final(d)
    for key in ("wall_time_s",) + TIME_KEYS:
        assert final[key] >= saved[key] >= 0, key
    for key in ("wall_time_s", "train_s"):  # the killed attempt trained, and so did the rerun
        assert final[key] > saved[key] > 0, key
    assert sum(final[k] for k in TIME_KEYS) == pytest.approx(final["wall_time_s"])
    _assert_same_params(load_model(d), load_model(reference))
    tb = tb_log.scalars(d / "tb")
    train = [r for r in rd.read_metrics(d) if r["kind"] == "train"]
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert [s for s, _ in tb["eval/val_loss"]] == [10, 20]
