"""Tuning inside the grid: planning from run directories (pure Python, synthetic results), dry run, and end to end."""

import json
import math

import pytest

from elmjax import run_dir as rd
from sweeps import run
from sweeps.grid import load_grid
from sweeps.plan import build_plan
from sweeps.tune import TUNE_FILE, plan_stage, write_tune_record
from sweep_helpers import TINY_BASE, write_grid

AXES = {"budget": {"kind": "params", "values": [4e4]}, "allocation": {"openelm": "openelm", "uniform": "uniform"},
        "seed": [0, 1]}


def _grid(tmp_path, values=(1e-3, 2e-3, 4e-3), **tune):
    spec = {"axis": "optimizer.lr", "values": list(values), "seeds": [100, 101], **tune}
    return load_grid(write_grid(tmp_path / "g.yaml", AXES, tune=spec))


def _finish(sweep, runs, loss_of, state="done"):
    """Write done runs whose select_on metric is loss_of(run)."""
    for r in runs:
        d = sweep / "runs" / r.name
        d.mkdir(parents=True, exist_ok=True)
        s = state(r) if callable(state) else state
        rd.write_status(d, s, step=1, total_steps=1)
        if s == "done":
            rd.write_final(d, {"val_loss": loss_of(r), "val_bpb": loss_of(r) / math.log(2)})


def _bowl(best_arm: float, best_twin: float):
    """Loss quadratic in log lr with its minimum at best_arm (layer-wise) or best_twin (uniform)."""
    def loss(r):
        best = best_twin if r.row["is_uniform"] else best_arm
        return 3.0 + 0.1 * math.log(r.row["tune_value"] / best) ** 2 + 0.001 * r.row["seed"]
    return loss


def test_each_cell_picks_its_own_value_then_plans_main_runs_at_it(tmp_path):
    grid = _grid(tmp_path, values=(1e-3, 2e-3, 4e-3, 8e-3))
    base = build_plan(grid)
    sweep = tmp_path / "sweep"
    stage = plan_stage(grid, base, sweep)
    # 2 cells (openelm, its twin) x 4 values x 2 tuning seeds; no main run before tuning is done
    assert len(stage.cells) == 2 and len(stage.tune_runs) == 16 and stage.main_runs == [] and stage.waiting == 4
    assert {r.row["role"] for r in stage.tune_runs} == {"tune"}
    assert {r.config.train.seed for r in stage.tune_runs} == {100, 101} == {r.config.data.seed for r in stage.tune_runs}
    loss = _bowl(best_arm=2e-3, best_twin=4e-3)
    _finish(sweep, stage.tune_runs[:-1], loss)  # all but one: still nothing to plan for that cell's arm
    partial = plan_stage(grid, base, sweep)
    assert partial.main_runs == [r for r in partial.main_runs if r.row["is_uniform"]]
    _finish(sweep, stage.tune_runs, loss)
    stage = plan_stage(grid, base, sweep)
    chosen = {c.base.row["is_uniform"]: c.chosen for c in stage.cells.values()}
    assert chosen == {False: 2e-3, True: 4e-3}
    assert all(c.extended == [] and c.status == "chosen" for c in stage.cells.values())
    mains = stage.main_runs
    assert len(mains) == 4 and {r.row["role"] for r in mains} == {"main"}
    by_name = {r.name: r for r in mains}
    for r in mains:
        assert r.config.optimizer.lr == r.row["lr"] == r.row["tune_value"]
        assert r.config.train.seed in (0, 1)
        if not r.row["is_uniform"]:  # an arm's twin is its twin's main run at the twin's own value
            twin = by_name[r.row["twin"]]
            assert twin.row["is_uniform"] and twin.config.train.seed == r.config.train.seed
    # tuning runs pair with their twin's tuning run at the same value and seed
    tr = {r.name: r for r in stage.tune_runs}
    for r in stage.tune_runs:
        if not r.row["is_uniform"]:
            t = tr[r.row["twin"]]
            assert (t.row["tune_value"], t.row["seed"]) == (r.row["tune_value"], r.row["seed"])


def test_best_value_at_an_edge_extends_the_range_at_most_twice(tmp_path):
    grid = _grid(tmp_path)
    base = build_plan(grid)
    sweep = tmp_path / "sweep"
    loss = _bowl(best_arm=1e-3 / 8, best_twin=3e-3)  # the arm wants a far lower lr than the grid offers
    for _ in range(4):  # each pass finishes what is planned, as drivers would
        stage = plan_stage(grid, base, sweep)
        _finish(sweep, stage.tune_runs, loss)
    stage = plan_stage(grid, base, sweep)
    arm = next(c for c in stage.cells.values() if not c.base.row["is_uniform"])
    twin = next(c for c in stage.cells.values() if c.base.row["is_uniform"])
    assert arm.extended == ["down to 0.0005", "down to 0.00025"]
    assert arm.values == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    assert arm.chosen == pytest.approx(2.5e-4) and "still at the edge" in arm.note
    # the twin's optimum 3e-3 puts 4e-3 at the top edge: one step up (8e-3) is worse, so 4e-3 stays, inside now
    assert twin.extended == ["up to 0.008"] and twin.chosen == 4e-3 and twin.note == ""
    write_tune_record(grid, stage, sweep)
    record = json.loads((sweep / TUNE_FILE).read_text())
    cell = next(c for c in record["cells"] if not c["is_uniform"])
    assert cell["extended"] == arm.extended and cell["chosen"] == pytest.approx(2.5e-4)
    assert [c["value"] for c in cell["candidates"]] == pytest.approx(arm.values)
    assert all(len(c["losses"]) == 2 for c in cell["candidates"])


def test_diverged_candidates_lose_and_a_cell_without_any_finite_one_plans_no_main_runs(tmp_path):
    grid = _grid(tmp_path)
    base = build_plan(grid)
    sweep = tmp_path / "sweep"
    stage = plan_stage(grid, base, sweep)
    # The arm diverges at every lr; the twin diverges at the top lr only (its best finite one is 2e-3).
    state = lambda r: "diverged" if (not r.row["is_uniform"] or r.row["tune_value"] == 4e-3) else "done"
    _finish(sweep, stage.tune_runs, _bowl(4e-3, 4e-3), state=state)
    stage = plan_stage(grid, base, sweep)
    arm = next(c for c in stage.cells.values() if not c.base.row["is_uniform"])
    twin = next(c for c in stage.cells.values() if c.base.row["is_uniform"])
    assert arm.status == "failed" and twin.chosen == 2e-3 and twin.extended == []
    assert stage.main_runs == [r for r in stage.main_runs if r.row["is_uniform"]] and len(stage.main_runs) == 2
    assert len(stage.dropped) == 2


def test_dry_run_shows_the_tuning_stage(tmp_path, capsys):
    path = write_grid(tmp_path / "g.yaml", AXES, tune={"axis": "lr", "values": {"log_range": [1e-4, 1e-2], "points": 3},
                                                        "seeds": [100]})
    assert run.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tuning: optimizer.lr over [0.0001, 0.001, 0.01] on seed(s) [100]" in out
    assert "stage 1: tuning runs" in out and "stage 2: main runs" in out
    assert "2 cells x 3 values x 1 seed(s) = 6 tuning runs" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_tuned_sweep_end_to_end(tmp_path):
    """Real training: tuning runs, then main runs at the chosen values, with a test split; rerun is a no-op."""
    from sweeps.results import read_results

    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "test_sequences": 8},
            "train": {**TINY_BASE["train"], "steps": 12, "eval_every": 12}, "checkpoint": {"enabled": False},
            "compilation_cache": str(tmp_path / "xla")}
    axes = {"budget": {"kind": "params", "values": [4e4]}, "allocation": {"openelm": "openelm", "uniform": "uniform"}}
    path = write_grid(tmp_path / "g.yaml", axes, base=base,
                      tune={"axis": "optimizer.lr", "values": [1e-3, 1e-2], "seeds": [100], "extend": 0})
    out = tmp_path / "sweep"
    assert run.main([str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
    df = read_results(out)
    assert sorted(df["role"]) == ["main", "main", "tune", "tune", "tune", "tune"]
    assert (df["status"] == "done").all() and df["test_loss"].notna().all()
    assert df["val_fingerprint"].nunique() == 1 and df["test_fingerprint"].nunique() == 1
    record = json.loads((out / TUNE_FILE).read_text())
    for cell in record["cells"]:
        means = {c["value"]: c["mean"] for c in cell["candidates"]}
        assert cell["status"] == "chosen" and cell["chosen"] == min(means, key=means.get)
        main = df[(df["role"] == "main") & (df["tune_cell"] == cell["cell"])]
        assert len(main) == 1 and main["lr"].iloc[0] == cell["chosen"]
    assert run.main([str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert len(read_results(out)) == 6


def test_the_driver_tunes_extends_then_trains_main_runs_and_a_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    """The driver loop with a stand-in trainer (a loss bowl in log lr): passes until the plan stops changing."""
    from sweeps import driver
    from sweeps.results import read_results

    trained = []

    def fake_train(planned, progress, lead):
        trained.append(planned.name)
        d = planned.config.run_dir
        value = _bowl(best_arm=1.6e-2, best_twin=2e-3)(planned)
        rd.write_status(d, "done", step=1, total_steps=1)
        rd.write_final(d, {"val_loss": value, "params": planned.row["params"]})
        return "done", ""

    monkeypatch.setattr(driver, "_train", fake_train)
    path = write_grid(tmp_path / "g.yaml", AXES, tune={"axis": "optimizer.lr", "values": [1e-3, 2e-3, 4e-3],
                                                        "seeds": [100]})
    out = tmp_path / "sweep"
    assert run.main([str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
    df = read_results(out)
    tune, main = df[df["role"] == "tune"], df[df["role"] == "main"]
    # the arm's optimum is above the range: two extensions up (8e-3, 1.6e-2); the twin's is inside
    assert len(tune) == 3 + 2 + 3 and len(main) == 4 and (df["status"] == "done").all()
    assert sorted(main["tune_value"].unique()) == [2e-3, 1.6e-2]
    assert set(main["seed"]) == {0, 1} and set(tune["seed"]) == {100}
    # every tuning run of a cell was trained before any main run of that cell (cells decide independently)
    for cell, g in df.groupby("tune_cell"):
        first_main = min(trained.index(n) for n in g.loc[g["role"] == "main", "run"])
        assert all(trained.index(n) < first_main for n in g.loc[g["role"] == "tune", "run"])
    # skips are counted in the last pass only (each pass skips what earlier passes trained)
    printed = capsys.readouterr().out
    assert "this driver: 12 done, 10 skipped (already done)" in printed
    assert "extended it up to 0.008 (extension 1 of at most 2)" in printed
    assert "extended it up to 0.016 (extension 2 of at most 2)" in printed
    assert len(trained) == len(set(trained)) == len(df)
    trained.clear()
    assert run.main([str(path), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert trained == [] and len(read_results(out)) == 12


def test_an_integer_setting_is_tuned_with_rounded_steps(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", AXES, tune={"axis": "optimizer.warmup_steps", "values": [2, 4],
                                                                  "seeds": [100]}))
    spec = grid.tune
    assert spec.integer and spec.step_beyond((2.0, 4.0), upward=True) == 8.0
    assert spec.step_beyond((3.0, 4.0), upward=False) == 2.0  # 3 * 3/4 = 2.25, rounded
    runs = plan_stage(grid, build_plan(grid), None).tune_runs
    assert {r.config.optimizer.warmup_steps for r in runs} == {2, 4}
    assert all(isinstance(r.config.optimizer.warmup_steps, int) for r in runs)
