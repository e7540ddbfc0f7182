"""--compile-ahead: which later run the driver compiles for, and a tiny sweep trained with it on and off."""

import json
from collections import OrderedDict

import pytest

from compile_log import backend_compiles
from elmjax import programs, run_dir as rd
from elmjax.sharding import make_mesh
from sweeps import ahead, run
from sweeps.driver import prepare
from sweeps.grid import load_grid
from sweeps.locks import FileLock, run_lock_path
from sweeps.plan import build_plan
from sweep_helpers import TINY_BASE, write_grid

AXES = {"budget": {"kind": "params", "values": [4e4, 6e4]}, "allocation": {"openelm": "openelm", "uniform": "uniform"},
        "seed": [0, 1]}


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(programs, "_compiled", OrderedDict())
    monkeypatch.setattr(programs, "_in_use", None)
    monkeypatch.setattr(programs, "stats", programs.AheadStats())


def test_modes():
    assert ahead.enabled("on", 1) and not ahead.enabled("off", 1)
    assert not ahead.enabled("on", 2)  # multi-host drivers never compile ahead
    assert not ahead.enabled("auto", 1)  # these tests run on CPU: off (see the README's measurement)


def test_the_next_run_with_other_programs_that_this_driver_will_train_is_compiled_for(tmp_path, monkeypatch):
    grid = load_grid(write_grid(tmp_path / "g.yaml", AXES))
    runs = prepare(grid, build_plan(grid), tmp_path / "sweep")
    # openelm/uniform x seed 0/1 per budget: two program sets per budget, each used by two runs.
    mesh = make_mesh(runs[0].config.mesh)
    key = [programs.program_key(r.config, mesh) for r in runs]
    assert key[0] == key[2] != key[1] == key[3] != key[4] == key[6] != key[5]
    started = []
    monkeypatch.setattr(programs, "compile_ahead", lambda cfg, mesh: started.append(cfg.run_dir) or True)
    kept = {key[0]}
    monkeypatch.setattr(programs, "is_kept", lambda cfg, mesh: programs.program_key(cfg, mesh) in kept)
    picker = ahead.Ahead(runs, retry=set(), stale_after_s=600)

    assert picker.before(0) is runs[1]  # while run 0 compiles and trains: run 1's programs
    assert picker.before(0) is None  # one at a time: run 1 is not reached yet
    kept.add(key[1])
    rd.write_status(runs[4].config.run_dir, "done")  # finished: not trained, though its programs serve run 6
    lock = FileLock.acquire(run_lock_path(runs[5].config.run_dir), heartbeat_s=0)  # held by a live driver
    try:
        assert picker.before(1) is runs[6]  # runs 2, 3 share kept programs; 4 is done; 5 is someone else's
    finally:
        lock.release()
    assert picker.before(2) is None and picker.before(5) is None  # run 6 not reached yet
    assert started == [runs[1].config.run_dir, runs[6].config.run_dir]
    # A run whose status file is torn is skipped here (the driver reports it when it gets there), not raised.
    (tmp_path / "sweep" / "runs" / runs[7].name / "status.json").write_text("{")
    kept.add(key[6])
    assert picker.before(6) is None


def test_a_tiny_sweep_gives_identical_results_with_compile_ahead_on_and_off(tmp_path, monkeypatch, capsys):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 8, "eval_every": 4},
            "checkpoint": {"every": 4, "keep": 1}, "compilation_cache": str(tmp_path / "xla")}
    axes = {"budget": {"kind": "params", "values": [4e4]}, "allocation": {"openelm": "openelm", "uniform": "uniform"},
            "seed": [0, 1]}
    grid = write_grid(tmp_path / "g.yaml", axes, base=base)
    val = {}
    for mode in ("on", "off"):
        monkeypatch.setattr(programs, "_compiled", OrderedDict())  # as a fresh process would start
        monkeypatch.setattr(programs, "stats", programs.AheadStats())
        out = tmp_path / mode
        with backend_compiles() as compiled:
            assert run.main([str(grid), "--out", str(out), "--no-progress", "--no-report",
                             f"--compile-ahead={mode}"]) == 0
        finals = {d.name: json.loads((d / "final.json").read_text()) for d in sorted((out / "runs").iterdir())}
        val[mode] = {name: f["val_loss"] for name, f in finals.items()}
        # Two shapes, four runs: each train step compiled once, whichever thread did it.
        assert compiled.count("jit(train_step)") == 2
        assert programs.stats.compiled == (1 if mode == "on" else 0)
        for f in finals.values():  # the parts still add up to the run's wall time
            assert sum(f[k] for k in ("compile_s", "train_s", "eval_s", "checkpoint_s", "other_s")) == \
                pytest.approx(f["wall_time_s"], abs=1e-6)
    assert "compiled ahead: 1 program set(s)" in capsys.readouterr().out
    assert len(val["on"]) == 4 and val["on"] == val["off"]  # bit-identical
