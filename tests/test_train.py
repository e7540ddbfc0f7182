import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from elmjax import run_dir as rd
from elmjax.checkpoint import load_model
from elmjax.config_io import ConfigError
from elmjax.run_times import TIME_KEYS
from elmjax.train import run
from compile_log import compilations
from train_helpers import tiny_config, write_config


def params_of(run_dir):
    return jax.tree.leaves(nnx.state(load_model(run_dir), nnx.Param))


def train_rows(run_dir, keys=("step", "loss", "grad_norm", "lr", "batch_fingerprint")):
    return [{k: r[k] for k in keys} for r in rd.read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny run shared by the tests that compare against it."""
    d = tmp_path_factory.mktemp("ref") / "run"
    result = run(tiny_config(d))
    return d, result


def test_run_writes_the_run_directory_contract(reference_run):
    d, result = reference_run
    assert result.state == "done"
    assert {"config.yaml", "status.json", "metrics.jsonl", "final.json", "checkpoints", "tb"} <= {p.name for p in d.iterdir()}
    assert rd.read_status(d)["state"] == "done"
    rows = rd.read_metrics(d)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(2, 21, 2))
    assert [r["step"] for r in evals] == [10, 20]
    assert {"tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "batch_fingerprint"} <= set(train[0])
    assert train[-1]["tokens"] == 20 * 8 * 32
    final = json.loads((d / "final.json").read_text())
    assert final["val_loss"] == evals[-1]["val_loss"]
    assert final["val_ppl"] == pytest.approx(np.exp(final["val_loss"]))
    # Byte tokenizer: about one token per byte (EOS separators carry no bytes).
    from elmjax.data import validation_set

    bpt = validation_set(tiny_config(d).data).bytes_per_token
    assert 0.98 < bpt <= 1.0
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / np.log(2) / bpt, rel=1e-9)
    assert 0 < final["val_acc"] < 1
    # Where the wall time went: every part measured, and together they are the wall time.
    assert all(final[k] > 0 for k in ("compile_s", "train_s", "eval_s", "checkpoint_s")), final
    assert final["other_s"] >= 0
    assert sum(final[k] for k in TIME_KEYS) == pytest.approx(final["wall_time_s"])
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    assert list((d / "tb").iterdir())


def test_finished_run_is_not_retrained(reference_run):
    d, _ = reference_run
    before = (d / "metrics.jsonl").read_text()
    again = run(tiny_config(d))
    assert again.state == "done" and again.final == rd.read_final(d)
    assert (d / "metrics.jsonl").read_text() == before


def test_resume_into_a_directory_with_another_config_is_refused(reference_run):
    d, _ = reference_run
    with pytest.raises(ConfigError, match="different config"):
        run(tiny_config(d, "optimizer.lr=1e-2"))


def _launch(cfg_path, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "elmjax.train", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env)


def ckpt_steps(d: Path) -> list[int]:
    """Finished checkpoint steps (orbax renames '<step>.orbax-checkpoint-tmp' when done)."""
    root = d / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


# A SIGKILL then resume: tests/test_faults.py::test_sigkill_then_resume_gives_the_same_metrics_and_tensorboard


def test_sigterm_saves_a_checkpoint_and_exits_resumably(tmp_path, reference_run):
    d = tmp_path / "run"
    cfg = tiny_config(d, "train.steps=2000", "checkpoint.every=1000")
    with open(tmp_path / "log.txt", "w") as log:
        proc = _launch(write_config(cfg, tmp_path / "c.yaml"), log)
        deadline = time.time() + 120
        while not train_rows(d) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    status = rd.read_status(d)
    assert status["state"] == "pending" and "SIGTERM" in status["error"]
    steps = ckpt_steps(d)
    assert steps == [status["step"]] and 0 < status["step"] < 1000


def test_non_finite_loss_marks_the_run_diverged(tmp_path):
    d = tmp_path / "run"
    cfg = tiny_config(d, "optimizer.lr=1e9", "optimizer.warmup_steps=0", "optimizer.clip_norm=0", "train.log_every=1")
    result = run(cfg)
    assert result.state == "diverged" and result.final is None
    status = rd.read_status(d)
    assert status["state"] == "diverged" and status["step"] >= 1 and "non-finite" in status["error"]
    assert not (d / "final.json").exists()
    # No checkpoint holds a non-finite state.
    assert all(s < status["step"] for s in ckpt_steps(d))


def test_same_data_seed_gives_same_batches_whatever_the_model(tmp_path, reference_run):
    ref_dir, _ = reference_run
    d = tmp_path / "other"
    run(tiny_config(d, "model.qkv_multipliers=1.0", "model.num_layers=3", "train.steps=6", "train.eval_every=100"))
    fp = [r["batch_fingerprint"] for r in train_rows(d)]
    assert fp == [r["batch_fingerprint"] for r in train_rows(ref_dir)][: len(fp)]
    d2 = tmp_path / "seeded"
    run(tiny_config(d2, "data.seed=1", "train.steps=2", "train.eval_every=100"))
    assert train_rows(d2)[0]["batch_fingerprint"] != fp[0]


def test_gradient_accumulation_matches_the_full_batch(tmp_path, reference_run):
    ref_dir, _ = reference_run
    d = tmp_path / "accum"
    run(tiny_config(d, "execution.grad_accum=4", "train.eval_every=100"))
    got = train_rows(d)
    want = train_rows(ref_dir)[: len(got)]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-3)


def test_sharded_mesh_matches_one_device(tmp_path, reference_run, caplog):
    assert jax.device_count() == 8
    ref_dir, _ = reference_run
    d = tmp_path / "mesh"
    run(tiny_config(d, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.eval_every=100"))
    # The tiny model's first layer has one kv head: said before training.
    assert "layers/0/attn/qkv_DKCE: kv_heads=1 not divisible by tensor=2" in caplog.text
    got, want = train_rows(d), train_rows(ref_dir)
    for g, w in zip(got, want, strict=True):
        assert g["batch_fingerprint"] == w["batch_fingerprint"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    for x, y in zip(params_of(d), params_of(ref_dir), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_resume_with_another_execution_policy_continues(tmp_path, reference_run):
    """Remat, micro-batches and the mesh say how a run executes, not what it is:
    a run started with remat off on one device resumes with remat on, 2
    micro-batches and a 4-device mesh. Its losses then differ from the
    uninterrupted run's only by float32 reduction order."""
    import shutil

    ref_dir, _ = reference_run
    d = tmp_path / "run"
    shutil.copytree(ref_dir, d)
    for step in (15, 20):  # back to the state after step 10 of the same run
        shutil.rmtree(d / "checkpoints" / str(step))
    (d / "final.json").unlink()
    rd.write_status(d, "running", step=10, total_steps=20)
    result = run(tiny_config(d, "execution.remat=true", "execution.grad_accum=2", "mesh.data=4"))
    assert result.state == "done"
    got, want = train_rows(d), train_rows(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got[:5] == want[:5]  # the first 10 steps are the original run's rows
    for g, w in zip(got[5:], want[5:], strict=True):
        assert g["batch_fingerprint"] == w["batch_fingerprint"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    assert any(g["loss"] != w["loss"] for g, w in zip(got[5:], want[5:]))  # really executed differently
    for x, y in zip(params_of(d), params_of(ref_dir), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_batch_not_divisible_by_mesh_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size \(8\) must be divisible by mesh data\*fsdp \(8\) x execution.grad_accum \(2\)"):
        run(tiny_config(tmp_path / "r", "mesh.data=8", "execution.grad_accum=2"))
    assert rd.read_status(tmp_path / "r")["state"] == "failed"


def test_cli_rejects_unknown_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stepz: 3\n")
    out = subprocess.run([sys.executable, "-m", "elmjax.train", str(f)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "train.stepz: unknown key (did you mean 'steps'?)" in out.stderr


def test_persistent_compilation_cache_is_reused(tmp_path):
    cache = tmp_path / "xla-cache"

    def train(name, *overrides):
        cfg = tiny_config(tmp_path / name, "train.steps=2", "train.eval_every=100", *overrides, cache=cache)
        env = dict(os.environ, JAX_LOG_COMPILES="1")  # makes JAX log cache hits and misses
        out = subprocess.run([sys.executable, "-m", "elmjax.train", str(write_config(cfg, tmp_path / f"{name}.yaml"))],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stderr

    first = train("a")
    assert "Finished XLA compilation of jit(train_step)" in first
    assert "cache hit for 'jit_train_step'" not in first
    assert any(cache.rglob("*")), "nothing was written to the compilation cache"
    second = train("b", "train.seed=1")  # same shapes, another seed, a fresh process: nothing is recompiled
    assert "Persistent compilation cache hit for 'jit_train_step'" in second
    compiled = set(re.findall(r"Finished XLA compilation of jit\((\w+)\)", second))
    hits = set(re.findall(r"Persistent compilation cache hit for 'jit_(\w+)'", second))
    # The init state is assembled on the host (elmjax.host_state) from two model-independent draw programs.
    assert {"_draw_key_words", "_erf_inv_normals", "train_step", "eval_step"} <= compiled
    assert compiled - hits == set(), "compiled afresh for another seed (a seed-dependent constant in the program?)"


def test_next_seed_in_the_same_process_reuses_the_compiled_programs(tmp_path):
    first = run(tiny_config(tmp_path / "s0", "train.steps=3", "train.eval_every=100"))
    # Another seed and run_dir, the same shapes: the programs compiled for the first run are reused.
    with compilations() as compiled:
        result = run(tiny_config(tmp_path / "s1", "train.steps=3", "train.eval_every=100", "train.seed=1"))
    assert result.state == "done"
    programs = [m for m in compiled if any(f"jit({p})" in m for p in ("create", "train_step", "eval_step"))]
    assert programs == []
    assert result.final["val_loss"] != first.final["val_loss"]  # it did train another seed
