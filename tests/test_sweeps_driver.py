"""End to end with the real trainer: results, skip, SIGKILL resume, concurrent drivers, failure isolation.

All runs are tiny (2 layers, width ~40, 32-token sequences, 48 steps) and
share one persistent compilation cache, so after the first compile the
subprocess drivers mostly pay for importing JAX.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elmjax import run_dir as rd
from sweeps import run
from sweeps.grid import load_grid
from sweeps.plan import build_plan
from sweeps.results import PARQUET, read_results
from sweep_helpers import TINY_BASE, write_grid

STEPS = 48


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """openelm + its uniform twin at one tiny budget: 2 runs."""
    d = tmp_path_factory.mktemp("grid")
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": STEPS}, "checkpoint": {"every": 8, "keep": 2},
            "compilation_cache": str(d / "xla")}
    return write_grid(d / "tiny.yaml", {"budget": {"kind": "params", "values": [4e4]},
                                        "allocation": {"openelm": "openelm", "uniform": "uniform"}}, base=base)


@pytest.fixture(scope="module")
def reference(grid, tmp_path_factory):
    """The sweep run once, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("ref") / "sweep"
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 0
    return out


def train_steps(run_dir):
    return [r["step"] for r in rd.read_metrics(run_dir) if r["kind"] == "train"]


def results(sweep_dir):
    return read_results(sweep_dir)


def launch(grid, out, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sweeps.run", str(grid), "--out", str(out), "--no-progress",
                             "--no-report"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_sweep_trains_every_run_and_writes_results(reference, grid):
    df = results(reference)
    names = [r.name for r in build_plan(load_grid(grid))]
    assert list(df["run"]) == names and (df["status"] == "done").all()
    assert df[["val_loss", "val_ppl", "val_bpb", "val_acc", "wall_time_s"]].notna().all().all()
    assert (df["final_step"] == STEPS).all() and df["twin"][0] == names[1]
    for name in names:
        assert train_steps(reference / "runs" / name) == list(range(2, STEPS + 1, 2))
        assert rd.read_final(reference / "runs" / name)["params"] == int(df.set_index("run")["params"][name])


def test_rerun_skips_finished_runs(reference, grid, capsys):
    before = {p: p.read_text() for p in reference.glob("runs/*/metrics.jsonl")}
    assert run.main([str(grid), "--out", str(reference), "--no-progress", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert out.count(": already done") == 2 and ": training" not in out
    assert {p: p.read_text() for p in reference.glob("runs/*/metrics.jsonl")} == before


def test_a_missing_or_failing_report_never_fails_the_sweep(reference, grid, capsys, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "analysis.report", None)  # not importable
    assert run.main([str(grid), "--out", str(reference), "--no-progress"]) == 0
    assert "analysis.report is not importable" in capsys.readouterr().err

    def broken(sweep_dir):
        raise ValueError("no fits for this sweep")

    monkeypatch.setitem(sys.modules, "analysis.report", types.SimpleNamespace(write_report=broken))
    assert run.main([str(grid), "--out", str(reference), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "the report failed (ValueError: no fits for this sweep)" in captured.err
    assert f"results: {reference / PARQUET}" in captured.out


def test_sigkill_mid_run_then_rerun_resumes_without_lost_or_duplicated_rows(reference, grid, tmp_path):
    out = tmp_path / "sweep"
    names = [r.name for r in build_plan(load_grid(grid))]
    first = out / "runs" / names[0]
    with open(tmp_path / "log.txt", "w") as log:
        proc = launch(grid, out, log)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            ckpts = [int(p.name) for p in (first / "checkpoints").glob("*") if p.name.isdigit()]
            if ckpts and 8 <= max(ckpts) < STEPS - 16:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert rd.read_status(first)["state"] == "running", (tmp_path / "log.txt").read_text()[-3000:]
    killed_at = len(train_steps(first))
    assert 0 < killed_at < STEPS // 2
    assert results(out)["status"].tolist()[0] in ("pending", "running")
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 0
    df = results(out)
    assert list(df["run"]) == names and (df["status"] == "done").all()
    for name in names:
        assert train_steps(out / "runs" / name) == list(range(2, STEPS + 1, 2))  # none lost, none twice
    # Resuming is exact: the killed sweep ends where the uninterrupted one did.
    ref = results(reference).set_index("run")["val_loss"]
    assert df.set_index("run")["val_loss"].to_dict() == pytest.approx(ref.to_dict(), rel=1e-5)


def test_two_drivers_on_one_sweep_never_train_the_same_run(reference, grid, tmp_path):
    out = tmp_path / "sweep"
    logs = [tmp_path / f"driver{i}.txt" for i in range(2)]
    handles = [open(p, "w") for p in logs]
    procs = [launch(grid, out, h) for h in handles]
    codes = [p.wait(timeout=300) for p in procs]
    for h in handles:
        h.close()
    texts = [p.read_text() for p in logs]
    assert codes == [0, 0], texts
    names = [r.name for r in build_plan(load_grid(grid))]
    for name in names:
        trained = sum(t.count(f"{name}: training") for t in texts)
        assert trained == 1, f"{name} trained {trained} times:\n" + "\n".join(texts)
        assert train_steps(out / "runs" / name) == list(range(2, STEPS + 1, 2))
    df = results(out)
    assert list(df["run"]) == names and (df["status"] == "done").all()
    ref = results(reference).set_index("run")["val_loss"]
    assert df.set_index("run")["val_loss"].to_dict() == pytest.approx(ref.to_dict(), rel=1e-5)


def test_eval_tasks_score_finished_runs_without_retraining(reference, grid, tmp_path, capsys):
    import yaml

    from sweeps.evals import read_eval

    task = tmp_path / "toy.jsonl"
    questions = [("def f(x):\n    return", [" x", " {"]), ("import", [" os", " )"]), ("for i in", [" range(3):", " ]"])]
    task.write_text("".join(json.dumps({"context": c, "choices": ch, "gold": 0}) + "\n" for c, ch in questions))
    spec = yaml.safe_load(grid.read_text())
    with_eval = write_grid(tmp_path / "tiny.yaml", spec["axes"], base=spec["base"], name=spec["name"],
                           eval={"tasks": [str(task)]})
    metrics = {p: p.read_text() for p in reference.glob("runs/*/metrics.jsonl")}
    assert run.main([str(with_eval), "--out", str(reference), "--no-progress", "--no-report"]) == 0
    assert capsys.readouterr().out.count(": toy acc ") == 2
    df = results(reference)
    assert df["eval.toy.acc"].between(0, 1).all() and df["eval.toy.acc_norm"].notna().all()
    assert {p: p.read_text() for p in reference.glob("runs/*/metrics.jsonl")} == metrics  # not retrained
    for name in df["run"]:
        assert read_eval(reference / "runs" / name)["tasks"]["toy"]["n"] == len(questions)
    stamps = {p: p.stat().st_mtime_ns for p in reference.glob("runs/*/eval.json")}
    assert run.main([str(with_eval), "--out", str(reference), "--no-progress", "--no-report"]) == 0
    assert {p: p.stat().st_mtime_ns for p in reference.glob("runs/*/eval.json")} == stamps  # not scored twice


def make_jsonl(path: Path, docs: int = 300) -> None:
    import sysconfig

    text = "".join(p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:20])
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": text[i * 400:(i + 1) * 400]}) + "\n")


def test_failures_are_isolated_recorded_and_retried_only_when_asked(tmp_path, capsys):
    good, missing = tmp_path / "good.jsonl", tmp_path / "missing.jsonl"
    make_jsonl(good)
    model = {**TINY_BASE["model"], "model_dim": 32, "qkv_multipliers": 1.0, "ffn_multipliers": 2.0}
    data = {**TINY_BASE["data"], "source": "jsonl", "max_documents": None}
    base = {**TINY_BASE, "model": model, "data": data, "compilation_cache": str(tmp_path / "xla"),
            "train": {**TINY_BASE["train"], "steps": 12}}
    grid = write_grid(tmp_path / "fail.yaml", {"data.paths": [[str(missing)], [str(good)]], "lr": [3e-3, 1e6]},
                      base=base, exclude=[{"data.paths": [[str(missing)]], "lr": 1e6}])
    out = tmp_path / "sweep"
    # The failing run comes first: the sweep must go on past it.
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 1
    df = results(out)
    assert df["status"].tolist() == ["failed", "done", "diverged"]
    assert "file not found" in df["error"][0] and "non-finite" in df["error"][2]
    names = df["run"].tolist()
    done_log = (out / "runs" / names[1] / "metrics.jsonl").read_text()
    diverged_status = (out / "runs" / names[2] / "status.json").read_text()
    capsys.readouterr()

    make_jsonl(missing)  # fix the cause
    # Not retried without the flag:
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 1
    assert "failed earlier" in capsys.readouterr().out and results(out)["status"][0] == "failed"

    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report", "--retry-failed"]) == 0
    assert results(out)["status"].tolist() == ["done", "done", "diverged"]
    assert (out / "runs" / names[1] / "metrics.jsonl").read_text() == done_log  # finished runs untouched
    assert (out / "runs" / names[2] / "status.json").read_text() == diverged_status  # a divergence is a result


@pytest.mark.slow
def test_a_multi_host_sweep_trains_each_run_once_across_processes(tmp_path):
    """Two processes x 4 CPU devices (jax.distributed + gloo) run the sweep together: process 0 decides."""
    import socket

    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "batch_size": 8}, "mesh": {"data": -1},
            "train": {**TINY_BASE["train"], "steps": 8}, "compilation_cache": ""}
    grid = write_grid(tmp_path / "mh.yaml", {"budget": {"kind": "params", "values": [4e4]},
                                             "allocation": {"openelm": "openelm", "uniform": "uniform"}}, base=base)
    out = tmp_path / "sweep"

    def launch_all(tag):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for pid in range(2):
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                       ELMJAX_COORDINATOR=f"127.0.0.1:{port}", ELMJAX_NUM_PROCESSES="2", ELMJAX_PROCESS_ID=str(pid))
            log = open(tmp_path / f"{tag}{pid}.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "sweeps.run", str(grid), "--out", str(out),
                                           "--no-progress", "--no-report"], env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=600) for p in procs]
        logs = [(tmp_path / f"{tag}{pid}.log").read_text() for pid in range(2)]
        assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
        return logs

    logs = launch_all("first")
    df = results(out)
    assert (df["status"] == "done").all() and len(df) == 2
    for name in df["run"]:
        assert train_steps(out / "runs" / name) == list(range(2, 9, 2))
        assert all(f"{name}: training" in log for log in logs)  # both processes trained it, together
    logs = launch_all("again")  # process 0 sees them done; process 1 follows its decision
    assert all(log.count(": already done") == 2 for log in logs)


def test_processes_of_one_multi_host_run_on_different_shards_stop_with_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "batch_size": 8}, "mesh": {"data": -1}, "compilation_cache": ""}
    grid = write_grid(tmp_path / "mh.yaml", {"seed": [0, 1]}, base=base)
    procs = []
    for pid in range(2):  # a Kubernetes Indexed Job numbering the hosts of one slice
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   ELMJAX_COORDINATOR=f"127.0.0.1:{port}", ELMJAX_NUM_PROCESSES="2", ELMJAX_PROCESS_ID=str(pid),
                   JOB_COMPLETION_INDEX=str(pid), ELMJAX_SHARD_COUNT="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "sweeps.run", str(grid), "--out", str(tmp_path / "out"),
                                       "--no-progress", "--no-report"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert all("on different shards [0, 1]" in out for out in outputs), outputs
    assert not list((tmp_path / "out" / "runs").glob("*/status.json"))  # nothing trained


def test_diverged_runs_are_skipped_unless_retry_diverged_is_given(tmp_path, capsys):
    """A run recorded as diverged (here: as a corrupted checkpoint would leave it) is retried only on request."""
    import shutil

    model = {**TINY_BASE["model"], "model_dim": 32, "qkv_multipliers": 1.0, "ffn_multipliers": 2.0}  # one run
    base = {**TINY_BASE, "model": model, "train": {**TINY_BASE["train"], "steps": 12},
            "checkpoint": {"every": 4, "keep": 3}, "compilation_cache": str(tmp_path / "xla")}
    grid = write_grid(tmp_path / "div.yaml", {"seed": [0]}, base=base)
    out = tmp_path / "sweep"
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 0
    run_dir = out / "runs" / build_plan(load_grid(grid))[0].name
    done_metrics = rd.read_metrics(run_dir)
    # Back to how a divergence at step 10 leaves it: no checkpoint past step 8, no final.json, status diverged.
    shutil.rmtree(run_dir / "checkpoints" / "12")
    (run_dir / "final.json").unlink()
    rd.write_status(run_dir, "diverged", step=10, total_steps=12, error="non-finite loss or gradient at step 10")
    capsys.readouterr()
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report", "--retry-failed"]) == 0
    assert "diverged earlier (a result; rerun with --retry-diverged" in capsys.readouterr().out
    assert rd.read_status(run_dir)["state"] == "diverged"
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report", "--retry-diverged"]) == 0
    assert f"{run_dir.name}: training" in capsys.readouterr().out
    assert results(out)["status"].tolist() == ["done"]
    assert train_steps(run_dir) == list(range(2, 13, 2))  # resumed from step 8: nothing lost, nothing twice
    assert rd.read_metrics(run_dir)[-1]["val_loss"] == pytest.approx(done_metrics[-1]["val_loss"], rel=1e-5)


def _tree(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_out_that_is_not_a_sweep_is_refused_without_writing_anything(tmp_path, capsys, monkeypatch):
    from sweeps.driver import Summary

    monkeypatch.setattr(run, "run_sweep", lambda *a, **k: Summary())  # about where the sweep goes, not training
    grid = write_grid(tmp_path / "g.yaml", {"seed": [0]})
    busy = tmp_path / "project"
    busy.mkdir()
    (busy / "results.csv").write_text("precious,data\n1,2\n")
    (busy / "report").mkdir()
    (busy / "report" / "notes.md").write_text("mine")
    before = _tree(busy)
    assert run.main([str(grid), "--out", str(busy), "--no-progress", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(busy) in err and "not a sweep (no plan.json)" in err and "--force" in err
    assert _tree(busy) == before

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{a_file} is a file, not a directory" in err, err
    assert a_file.read_text() == "x"

    # --force writes into it; after that it is a sweep, and a rerun needs no --force.
    assert run.main([str(grid), "--out", str(busy), "--no-progress", "--no-report", "--dry-run"]) == 0
    assert run.main([str(grid), "--out", str(busy), "--no-progress", "--no-report", "--force"]) == 0
    assert (busy / "plan.json").exists() and (busy / "report" / "notes.md").read_text() == "mine"
    assert run.main([str(grid), "--out", str(busy), "--no-progress", "--no-report"]) == 0


def test_a_marker_renamed_into_place_while_the_driver_looks_is_still_a_sweep(tmp_path, monkeypatch):
    """Two drivers started together on a new directory: the second looked for grid.yaml (not there yet),
    then the first renamed its temporary file onto grid.yaml, then the second looked for the temporary
    file (gone) and refused the directory as not a sweep. The rename here lands between any two looks."""
    out = tmp_path / "out"
    out.mkdir()
    tmp = out / ".grid.yaml.x1y2.tmp"
    tmp.write_text("grid")
    real_exists, real_iterdir = Path.exists, Path.iterdir

    def rename_once():
        if real_exists(tmp):
            os.replace(tmp, out / "grid.yaml")

    def exists(self, *a, **k):  # the writer's rename lands right after the driver looked for grid.yaml ...
        seen = real_exists(self, *a, **k)
        if self == out / "grid.yaml":
            rename_once()
        return seen

    def iterdir(self):  # ... or right after it listed the directory
        found = list(real_iterdir(self))
        if self == out:
            rename_once()
        return iter(found)

    monkeypatch.setattr(Path, "exists", exists)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    run._check_out(out, force=False)  # raised ConfigError before
    assert real_exists(out / "grid.yaml")


def test_a_sweep_whose_first_marker_is_still_being_written_is_not_refused(tmp_path, capsys, monkeypatch):
    """Process 1 of a multi-host sweep can look while process 0 is mid-way through
    the atomic write of grid.yaml: only its temporary file exists. That is a sweep
    starting, not someone else's directory (the two-process test caught the race)."""
    from sweeps.driver import Summary

    monkeypatch.setattr(run, "run_sweep", lambda *a, **k: Summary())
    grid = write_grid(tmp_path / "g.yaml", {"seed": [0]})
    out = tmp_path / "out"
    out.mkdir()
    (out / ".grid.yaml.x1y2.tmp").write_text("half")
    assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report"]) == 0, capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".notes.md.tmp").write_text("mine")  # not a sweep marker: still refused
    assert run.main([str(grid), "--out", str(tmp_path / "other"), "--no-progress", "--no-report"]) == 2
