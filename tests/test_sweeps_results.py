"""results.parquet / .csv: contract columns, states read from run directories, atomic rewrites."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from elmjax import run_dir as rd
from sweeps.driver import prepare
from sweeps.grid import load_grid
from sweeps.locks import FileLock, run_lock_path
from sweeps.results import CSV, PARQUET, read_results, write_results
from sweep_helpers import write_grid

CONTRACT = [
    "run", "run_dir", "status", "error", "arm", "is_uniform", "twin", "budget_kind", "budget", "budget_rel_error",
    "seed", "num_layers", "model_dim", "head_dim", "num_gqa_groups", "qkv_schedule", "ffn_schedule",
    "alpha_min", "alpha_max", "beta_min", "beta_max", "q_heads", "kv_heads", "ffn_dims", "params",
    "non_embedding_params", "flops_per_token", "tokens", "train_flops", "lr", "seq_len", "batch_size",
    "val_loss", "val_ppl", "val_bpb", "val_acc", "train_loss", "final_step", "tokens_seen", "wall_time_s",
    "compile_s", "train_s", "eval_s", "checkpoint_s", "other_s",
]
FINAL = {"step": 20, "tokens": 2560, "val_loss": 2.0, "val_ppl": 7.389, "val_bpb": 2.9, "val_acc": 0.4,
         "train_loss": 2.1, "wall_time_s": 12.5, "compile_s": 2.0, "train_s": 9.0, "eval_s": 0.5,
         "checkpoint_s": 0.5, "other_s": 0.5, "params": 1, "non_embedding_params": 1, "flops_per_token": 1}


@pytest.fixture()
def sweep(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", {"seed": [0, 1], "lr": [1e-3, 3e-3]}))
    from sweeps.plan import build_plan

    runs = prepare(grid, build_plan(grid), tmp_path / "sweep")
    return tmp_path / "sweep", runs


def test_table_follows_the_contract_and_the_run_directories(sweep):
    sweep_dir, runs = sweep
    d = [r.config.run_dir for r in runs]
    rd.write_final(d[0], FINAL)
    rd.write_status(d[0], "done", step=20, total_steps=20)
    eval_record = {"files": ["/x/toy.jsonl"], "tasks": {"toy": {"acc": 0.5, "acc_norm": 0.6, "n": 4}}}
    (Path(d[0]) / "eval.json").write_text(json.dumps(eval_record))  # as sweeps.evals writes it
    rd.write_status(d[1], "failed", error="RuntimeError: RESOURCE_EXHAUSTED: out of memory")
    rd.write_status(d[2], "diverged", step=4, error="non-finite loss or gradient at step 4")
    lock = FileLock.acquire(run_lock_path(d[3]), heartbeat_s=0)
    rd.write_status(d[3], "running", step=3, total_steps=20)
    rd.write_status(d[4], "running", step=3, total_steps=20)  # its driver died: no lock
    write_results(sweep_dir)
    lock.release()
    df = pd.read_parquet(sweep_dir / PARQUET)
    assert list(df.columns[: len(CONTRACT)]) == CONTRACT
    assert {"axis.seed", "axis.optimizer.lr", "eval.toy.acc", "eval.toy.acc_norm"} <= set(df.columns)
    assert list(df["run"]) == [r.name for r in runs] and len(df) == len(runs) == 8  # 4 cells x (arm + twin)
    assert list(df["status"][:6]) == ["done", "failed", "diverged", "running", "pending", "pending"]
    assert "interrupted" in df["error"][4] and "out of memory" in df["error"][1]
    done = df.iloc[0]
    assert (done.val_loss, done.val_bpb, done.final_step, done.tokens_seen, done["eval.toy.acc"]) == (2.0, 2.9, 20, 2560, 0.5)
    assert (done.wall_time_s, done.train_s, done.compile_s) == (12.5, 9.0, 2.0)
    assert df["val_loss"][1:].isna().all() and df["train_s"][1:].isna().all()
    assert str(df["final_step"].dtype) == "Int64" and df["params"].gt(0).all()
    assert df["twin"][0] == df["run"][1] and bool(df["is_uniform"][1])
    csv = pd.read_csv(sweep_dir / CSV)
    assert list(csv["run"]) == list(df["run"]) and list(csv["status"]) == list(df["status"])
    assert not [p for p in sweep_dir.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".results.lock")]


def test_concurrent_rewrites_are_atomic_and_never_lose_rows(sweep):
    sweep_dir, runs = sweep
    write_results(sweep_dir)
    code = ("import sys; from sweeps.results import write_results\n"
            "for _ in range(8): write_results(sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(sweep_dir)]) for _ in range(3)]
    reads = 0
    for i, r in enumerate(runs):  # runs finish while the writers rewrite
        rd.write_final(r.config.run_dir, FINAL)
        rd.write_status(r.config.run_dir, "done")
    while any(p.poll() is None for p in procs):
        df = read_results(sweep_dir)  # a reader never sees a half-written (or mixed) file
        assert len(df) == len(runs) and df["run"].is_unique
        reads += 1
    assert all(p.returncode == 0 for p in procs) and reads > 0
    df = pd.read_parquet(sweep_dir / PARQUET)  # the last writer saw every finished run
    assert (df["status"] == "done").all()


def test_plan_rows_are_json_and_config_yaml_is_written_for_every_run(sweep):
    sweep_dir, runs = sweep
    plan = json.loads((sweep_dir / "plan.json").read_text())
    assert [r["run"] for r in plan["runs"]] == [r.name for r in runs]
    assert (sweep_dir / "grid.yaml").exists()
    for r in runs:
        assert (sweep_dir / "runs" / r.name / "config.yaml").exists()
        assert rd.read_status(r.config.run_dir)["state"] == "pending"
