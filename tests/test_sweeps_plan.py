"""Planning: twins, names and hashes, shared twins, the dry run of every shipped grid."""

import re
from pathlib import Path

import pytest

from elmjax import config_io
from sweeps import run
from sweeps.grid import load_grid
from sweeps.naming import config_hash
from sweeps.plan import build_plan
from sweep_helpers import write_grid

GRIDS = sorted((Path(__file__).parents[1] / "sweeps" / "grids").glob("*.yaml"))


def plan(tmp_path, axes, **top):
    return build_plan(load_grid(write_grid(tmp_path / "g.yaml", axes, **top)))


def without_model(cfg):
    d = config_io.to_dict(cfg)
    d.pop("model"), d.pop("name")
    return d


def test_every_layerwise_arm_has_a_uniform_twin_at_the_same_budget_and_data(tmp_path):
    runs = plan(tmp_path, {"budget": {"kind": "params", "values": [1.5e5, 2.5e5]}, "seed": [0, 1], "num_layers": [4],
                           "allocation": {"openelm": "openelm", "mid": "middle", "uniform": "uniform"}},
                match={"tolerance": 0.02})
    by_name = {r.name: r for r in runs}
    arms = [r for r in runs if not r.is_twin]
    assert len(arms) == 2 * 2 * 2
    for arm in arms:
        twin = by_name[arm.row["twin"]]
        assert twin.row["is_uniform"] and not arm.row["is_uniform"] and twin.row["arm"] == "uniform"
        assert twin.row["budget"] == arm.row["budget"] and twin.row["seed"] == arm.row["seed"]
        assert abs(twin.row["budget_rel_error"]) <= 0.02 and abs(arm.row["budget_rel_error"]) <= 0.02
        # Same data, seeds and training: only the model differs.
        assert without_model(twin.config) == without_model(arm.config)
        assert twin.config.model.num_layers == arm.config.model.num_layers
        assert abs(twin.row["params"] / arm.row["params"] - 1) <= 0.04 and twin.row["twin"] is None
    # Arms come first, each followed by its twin.
    assert [r.is_twin for r in runs[:2]] == [False, True]


def test_names_are_label_plus_hash_and_stable(tmp_path):
    axes = {"budget": {"kind": "params", "values": [4e4]}, "seed": [0], "allocation": {"openelm": "openelm"}}
    first = plan(tmp_path, axes, match={"tolerance": 0.02})
    again = plan(tmp_path, axes, match={"tolerance": 0.02})
    assert [r.name for r in first] == [r.name for r in again]
    assert re.fullmatch(r"openelm-N40k-s0-[0-9a-f]{8}", first[0].name)
    assert first[0].name.endswith(config_hash(first[0].config)) and first[0].config.name == first[0].name
    assert first[0].row["run_dir"] == f"runs/{first[0].name}"


def test_hash_covers_what_a_run_computes_only(tmp_path):
    cfg = plan(tmp_path, {"seed": [0]})[0].config
    same = [cfg.replace(run_dir="/elsewhere", name="x", compilation_cache=""),
            cfg.replace(checkpoint=cfg.checkpoint.__class__(every=7)),
            cfg.replace(mesh=cfg.mesh.__class__(data=-1, fsdp=2)),
            cfg.replace(execution=cfg.execution.__class__(dtype="bfloat16", remat=True, grad_accum=2)),
            cfg.replace(train=cfg.train.__class__(steps=cfg.train.steps, progress=False, log_every=1))]
    for other in same:
        assert config_hash(other) == config_hash(cfg)
    different = [cfg.replace(optimizer=cfg.optimizer.__class__(lr=1e-2)),
                 cfg.replace(train=cfg.train.__class__(steps=cfg.train.steps + 1)),
                 cfg.replace(model=cfg.model.replace(model_dim=cfg.model.model_dim + 1))]
    assert len({config_hash(c) for c in different} | {config_hash(cfg)}) == 4


def test_arms_with_the_same_mean_share_one_twin(tmp_path):
    runs = plan(tmp_path, {"budget": {"kind": "params", "values": [1e5]}, "alpha": [[0.5, 1.0]],
                           "beta": [[0.5, 4.0]], "schedule": ["linear", "reverse"]}, match={"tolerance": 0.02})
    arms = [r for r in runs if not r.is_twin]
    twins = [r for r in runs if r.is_twin]
    assert len(arms) == 2 and len(twins) == 1
    assert arms[0].row["twin"] == arms[1].row["twin"] == twins[0].name


def test_an_explicit_uniform_arm_equal_to_a_twin_is_one_run(tmp_path):
    axes = {"budget": {"kind": "params", "values": [2.5e5]},
            "allocation": {"openelm": "openelm", "flat": {"qkv": 0.75, "ffn": 2.25}}}
    base = {"model": {"num_layers": 4, "head_dim": 16, "num_gqa_groups": 2, "ffn_dim_divisor": 16},
            "train": {"steps": 10}}
    runs = build_plan(load_grid(write_grid(tmp_path / "g.yaml", axes, base=base)))
    assert [r.row["arm"] for r in runs] == ["openelm", "flat"]
    assert runs[0].row["twin"] == runs[1].name  # the explicit arm stands in for the twin


@pytest.mark.parametrize("grid", GRIDS, ids=[p.stem for p in GRIDS])
def test_shipped_grid_passes_dry_run_and_writes_nothing(grid, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run.main([str(grid), "--dry-run"]) == 0
    out = capsys.readouterr().out
    runs = build_plan(load_grid(grid))
    assert f"{len(runs)} runs" in out and all(r.name in out for r in runs)
    assert list(tmp_path.iterdir()) == []
    assert all(r.is_twin or r.row["is_uniform"] or r.row["twin"] for r in runs)


def test_quickstart_is_three_budgets_two_arms_two_seeds():
    runs = build_plan(load_grid(next(g for g in GRIDS if g.stem == "quickstart")))
    assert len(runs) == 12
    assert {r.row["budget"] for r in runs} == {1.5e5, 2.5e5, 4e5}
    assert {r.row["arm"] for r in runs} == {"openelm", "uniform"} and {r.row["seed"] for r in runs} == {0, 1}
    assert all(r.config.data.source == "stdlib" and r.config.data.tokenizer == "byte" for r in runs)


def test_openelm_ladder_recovers_the_released_sizes():
    from elmjax.model_config import PRESETS
    from elmjax.layout import param_counts

    runs = build_plan(load_grid(next(g for g in GRIDS if g.stem == "openelm_ladder")))
    arms = [r for r in runs if not r.is_twin]
    assert sorted(r.row["params"] for r in arms) == sorted(param_counts(p).total for p in PRESETS.values())
    assert sorted(r.row["model_dim"] for r in arms) == sorted(p.model_dim for p in PRESETS.values())
    assert all(r.config.mesh.fsdp == 8 for r in runs)


def test_dry_run_with_a_shard_lists_only_that_shard(tmp_path, capsys):
    grid = write_grid(tmp_path / "g.yaml", {"seed": [0, 1, 2]})
    runs = build_plan(load_grid(grid))
    assert run.main([str(grid), "--dry-run", "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    assert [r.name for r in runs if r.name in out] == [r.name for i, r in enumerate(runs) if i % 2 == 1]
    assert "shard 1/2" in out


def test_twin_matched_by_multipliers_keeps_the_arm_width(tmp_path):
    base = {"model": {"num_layers": 8, "head_dim": 32, "num_gqa_groups": 2, "ffn_dim_divisor": 32},
            "train": {"steps": 10}}
    runs = build_plan(load_grid(write_grid(tmp_path / "g.yaml", {"budget": {"kind": "params", "values": [3e6]},
                                                                 "allocation": {"openelm": "openelm"}},
                                           base=base, match={"twin": "multipliers"})))
    arm, twin = runs
    assert twin.is_twin and twin.config.model.model_dim == arm.config.model.model_dim
    assert abs(twin.row["budget_rel_error"]) <= 0.01 and twin.row["is_uniform"]


def test_without_a_budget_axis_the_twin_matches_the_arm_at_its_width(tmp_path):
    base = {"model": {"num_layers": 4, "model_dim": 96, "head_dim": 16, "num_gqa_groups": 2, "ffn_dim_divisor": 16},
            "train": {"steps": 10}}
    runs = build_plan(load_grid(write_grid(tmp_path / "g.yaml", {"allocation": {"openelm": "openelm"}}, base=base)))
    arm, twin = runs
    assert arm.config.model.model_dim == 96 and arm.row["budget_rel_error"] == 0.0
    assert arm.row["budget_kind"] == "params" and arm.row["budget"] == arm.row["params"] == twin.row["budget"]
    assert abs(twin.row["params"] / arm.row["params"] - 1) <= 0.01


def test_planning_and_status_never_import_jax(tmp_path):
    import subprocess
    import sys

    grid = next(g for g in GRIDS if g.stem == "openelm_ladder")
    code = ("import sys; from sweeps import run, status; from sweeps.grid import load_grid; "
            "from sweeps.plan import build_plan; from sweeps.results import build_table\n"
            f"build_plan(load_grid({str(grid)!r}))\n"
            "assert run.main([" + repr(str(grid)) + ", '--dry-run']) == 0\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'grain', 'orbax')]\n"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
