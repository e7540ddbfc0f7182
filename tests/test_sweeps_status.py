"""python -m sweeps.status: states, progress and latest metrics of every run."""

import json

from elmjax import run_dir as rd
from sweeps import status
from sweeps.driver import prepare
from sweeps.grid import load_grid
from sweeps.locks import FileLock, run_lock_path
from sweeps.plan import build_plan
from sweeps.results import PARQUET
from sweep_helpers import write_grid


def make_sweep(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", {"seed": [0, 1]}))
    return tmp_path / "sweep", prepare(grid, build_plan(grid), tmp_path / "sweep")


def test_status_table_shows_states_steps_and_latest_metrics(tmp_path, capsys):
    sweep_dir, runs = make_sweep(tmp_path)
    d = [r.config.run_dir for r in runs]
    rd.write_status(d[0], "done", step=20, total_steps=20)
    rd.write_final(d[0], {"val_loss": 1.2345, "step": 20})
    log = rd.MetricsLog(d[1])
    for step in (2, 4, 6):
        log.write({"kind": "train", "step": step, "loss": 5.0 - step / 10})
    log.write({"kind": "eval", "step": 4, "val_loss": 4.4})
    log.close()
    with open(f"{d[1]}/metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 8, "lo')  # a torn last line from a kill
    lock = FileLock.acquire(run_lock_path(d[1]), heartbeat_s=0)
    rd.write_status(d[1], "running", step=6, total_steps=20)
    rd.write_status(d[2], "failed", error="DataError: data.paths: file not found: 'x.jsonl'")
    try:
        assert status.main([str(sweep_dir), "--errors", "--results"]) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in {r.name for r in runs}}
    assert " done " in lines[runs[0].name] and "20/20" in lines[runs[0].name] and "1.2345" in lines[runs[0].name]
    running = lines[runs[1].name]
    assert " running " in running and "6/20" in running and "4.400" in running and "4.4000" in running
    assert ":" in running.split()[-1]  # host:pid of the driver holding it
    assert " failed " in lines[runs[2].name] and "file not found: 'x.jsonl'" in out
    assert " pending " in lines[runs[3].name]
    assert "1 done, 1 failed, 1 pending, 1 running (4 runs)" in out
    assert (sweep_dir / PARQUET).exists()


def test_status_of_a_directory_that_is_not_a_sweep(tmp_path, capsys):
    assert status.main([str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_latest_metrics_reads_only_the_tail(tmp_path):
    rows = [{"kind": "train", "step": i, "loss": float(i)} for i in range(20000)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert status.latest_metrics(tmp_path)["train"]["step"] == 19999
    assert "eval" not in status.latest_metrics(tmp_path)


def test_status_shows_the_share_of_wall_time_in_training_steps(tmp_path, capsys):
    sweep_dir, runs = make_sweep(tmp_path)
    d = [r.config.run_dir for r in runs]
    times = [{"wall_time_s": 10.0, "compile_s": 2.0, "train_s": 7.0, "eval_s": 0.5, "checkpoint_s": 0.3, "other_s": 0.2},
             {"wall_time_s": 30.0, "compile_s": 1.0, "train_s": 27.0, "eval_s": 1.0, "checkpoint_s": 0.5, "other_s": 0.5}]
    for run_dir, t in zip(d, times):
        rd.write_status(run_dir, "done", step=20, total_steps=20)
        rd.write_final(run_dir, {"val_loss": 1.0, "step": 20, **t})
    rd.write_status(d[2], "done", step=20, total_steps=20)
    rd.write_final(d[2], {"val_loss": 1.0, "step": 20, "wall_time_s": 5.0})  # finished before times were recorded
    assert status.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert lines[runs[0].name].split()[-1] == "70%" and lines[runs[1].name].split()[-1] == "90%"
    assert lines[runs[2].name].split()[-1] == "-"
    # 34 of 40 s in the two runs that recorded it: 85%.
    assert "time: 40 s in 2 finished run(s); training steps 85% of it (compile 8%, eval 4%, checkpoint 2%, other 2%)" in out
