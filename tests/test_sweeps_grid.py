"""Grid parsing and expansion: product, zip, exclude, first-class axes, token budgets."""

import math

import pytest


from elmjax.layout import param_counts, train_flops_per_token
from sweeps.expand import expand
from sweeps.grid import load_grid
from sweeps.plan import build_plan
from sweep_helpers import write_grid


def cells_as_values(grid):
    return [{a.name: a.raw[i] for a, i in zip(grid.axes, cell)} for cell in expand(grid)]


def test_product_in_axes_order(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.yaml", {"seed": [0, 1], "lr": [1e-3, 3e-3, 1e-2]}))
    cells = cells_as_values(grid)
    assert len(cells) == 6
    assert cells[:3] == [{"seed": 0, "lr": 1e-3}, {"seed": 0, "lr": 3e-3}, {"seed": 0, "lr": 1e-2}]
    assert cells[3] == {"seed": 1, "lr": 1e-3}


def test_zip_groups_vary_together(tmp_path):
    axes = {"lr": [1e-3, 3e-3], "optimizer.warmup_steps": [5, 10], "seed": [0, 1, 2]}
    grid = load_grid(write_grid(tmp_path / "g.yaml", axes, zip=[["lr", "optimizer.warmup_steps"]]))
    cells = cells_as_values(grid)
    assert len(cells) == 2 * 3
    assert {(c["lr"], c["optimizer.warmup_steps"]) for c in cells} == {(1e-3, 5), (3e-3, 10)}
    assert sorted(c["seed"] for c in cells) == [0, 0, 1, 1, 2, 2]


def test_exclude_drops_exactly_the_matching_cells(tmp_path):
    axes = {"seed": [0, 1], "lr": [1e-3, 3e-3], "optimizer.warmup_steps": [5, 10]}
    rules = [{"seed": 1, "lr": 3e-3}, {"optimizer.warmup_steps": [5, 10], "seed": 0, "lr": 1e-3}]
    grid = load_grid(write_grid(tmp_path / "g.yaml", axes, exclude=rules))
    cells = cells_as_values(grid)
    assert len(cells) == 8 - 2 - 2
    for c in cells:
        assert not (c["seed"] == 1 and c["lr"] == 3e-3)
        assert not (c["seed"] == 0 and c["lr"] == 1e-3)


def test_first_class_and_dotted_axes_set_the_config(tmp_path):
    axes = {"num_layers": [2, 3], "head_dim": [16], "seed": [7], "lr": ["2e-3"], "optimizer.weight_decay": [0.0]}
    grid = load_grid(write_grid(tmp_path / "g.yaml", axes))
    runs = build_plan(grid)
    assert len(runs) == 2 * 2  # each layer-wise base arm gets its twin
    for r in runs:
        c = r.config
        assert c.model.num_layers == r.row["axis.model.num_layers"] and c.model.head_dim == 16
        assert c.data.seed == c.train.seed == 7 == r.row["seed"] == r.row["axis.seed"]
        assert c.optimizer.lr == 2e-3 == r.row["axis.optimizer.lr"]
        assert c.optimizer.weight_decay == 0.0 == r.row["axis.optimizer.weight_decay"]


def test_allocation_shorthands_and_explicit_arms(tmp_path):
    axes = {"allocation": {"openelm": "openelm", "mid": "middle", "uniform": "uniform",
                           "heads": {"q_heads": [2, 4, 4], "ffn_dims": [32, 64, 96]},
                           "mine": {"qkv": [0.25, 1.0], "ffn": 2.0, "schedule": "ends"}},
            "num_layers": [3], "budget": {"kind": "params", "values": [6e4]}}
    runs = build_plan(load_grid(write_grid(tmp_path / "g.yaml", axes, match={"tolerance": 0.02})))
    arms = {r.row["arm"]: r for r in runs if not r.is_twin}
    assert set(arms) == {"openelm", "mid", "heads", "mine"}  # 'uniform' is the twins, not a run of its own
    assert arms["openelm"].config.model.qkv_multipliers == (0.5, 1.0)
    assert arms["mid"].config.model.qkv_schedule == "middle"
    assert arms["heads"].row["q_heads"] == "[2, 4, 4]" and arms["heads"].row["ffn_dims"] == "[32, 64, 96]"
    mine = arms["mine"].config.model
    assert (mine.qkv_multipliers, mine.qkv_schedule, mine.ffn_multipliers) == ((0.25, 1.0), "ends", 2.0)
    assert all(r.row["twin"] for r in arms.values())


def test_alpha_beta_schedule_axes_build_named_arms(tmp_path):
    axes = {"alpha": [[0.5, 1.0]], "beta": [[0.5, 4.0], 2.0], "schedule": ["linear", "middle"]}
    runs = build_plan(load_grid(write_grid(tmp_path / "g.yaml", axes)))
    arms = {r.row["arm"] for r in runs if not r.is_twin}
    assert arms == {"a0.5-1.0_b0.5-4.0_linear", "a0.5-1.0_b0.5-4.0_middle", "a0.5-1.0_b2.0_linear",
                    "a0.5-1.0_b2.0_middle"}
    for r in runs:
        if r.row["arm"] == "a0.5-1.0_b0.5-4.0_middle":
            assert r.config.model.ffn_multipliers == (0.5, 4.0) and r.config.model.ffn_schedule == "middle"


def test_token_budgets(tmp_path):
    axes = {"tokens": [2048, {"per_param": 0.5}, {"flops": 2e10}]}
    runs = build_plan(load_grid(write_grid(tmp_path / "g.yaml", axes)))
    by = {r.row["axis.tokens"]: r for r in runs if not r.is_twin}
    assert by["2048"].config.train.tokens == 2048 and by["2048"].config.train.steps is None
    m = by['{"per_param": 0.5}'].config.model
    assert by['{"per_param": 0.5}'].config.train.tokens == math.ceil(0.5 * param_counts(m).total)
    flops_run = by['{"flops": 20000000000.0}']
    fpt = train_flops_per_token(flops_run.config.model, 32)
    assert flops_run.config.train.tokens == round(2e10 / fpt)
    # The table reports what the trainer will train: whole steps.
    assert flops_run.row["tokens"] % (32 * 4) == 0 and abs(flops_run.row["train_flops"] - 2e10) <= fpt * 32 * 4


def test_eval_task_files_are_checked_when_the_grid_loads(tmp_path):
    from sweeps.problems import GridError

    good = tmp_path / "toy.jsonl"
    good.write_text('{"context": "1 + 1 =", "choices": [" 2", " 3"], "gold": 0}\n')
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"context": "x", "choices": [" a"], "gold": 3}\n')
    grid = load_grid(write_grid(tmp_path / "g.yaml", {"seed": [0]}, eval={"tasks": [str(good)]}))
    assert grid.eval.tasks == (str(good),)
    with pytest.raises(GridError) as e:
        load_grid(write_grid(tmp_path / "g.yaml", {"seed": [0]}, eval={"tasks": [str(good), str(bad), str(good)]}))
    msg = str(e.value)
    assert "eval.tasks[1]:" in msg and "broken.jsonl" in msg
    assert "eval.tasks[2]: task name 'toy' (the file stem) is also eval.tasks[0]" in msg
