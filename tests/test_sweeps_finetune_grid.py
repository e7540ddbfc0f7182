"""Fine-tuning grids (sweeps.finetune_grid): validation, cells, result rows."""

import json
from pathlib import Path

import pytest
import yaml

from elmjax import run_dir as rd
from elmjax.config_io import ConfigError
from sweeps.finetune_grid import cells, load_grid, result_row

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, **grid):
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(grid))
    return p


def test_shipped_peft_grid_expands_to_lora_and_dora_at_two_ranks(tmp_path):
    path = ROOT / "sweeps" / "grids" / "finetune" / "peft_cpu.yaml"
    grid = load_grid(path)
    got = cells(grid, path, tmp_path, "base")
    assert [n for n, _, _ in got] == ["method=lora_rank=2", "method=lora_rank=8", "method=dora_rank=2",
                                      "method=dora_rank=8"]
    assert {(c.peft.method, c.peft.rank) for _, _, c in got} == {("lora", 2), ("lora", 8), ("dora", 2), ("dora", 8)}
    assert all(c.init_from == "base" and c.eval.tasks for _, _, c in got)


def test_layer_axis_names_cells(tmp_path):
    p = write(tmp_path, init_from="somewhere", axes={"peft.layers": ["all", [0, 1], [2, 3]]})
    names = [n for n, _, c in cells(load_grid(p), p, tmp_path, "x")]
    assert names == ["layers=all", "layers=0-1", "layers=2-3"]


@pytest.mark.parametrize("grid, match", [
    ({"init_from": "b", "axes": {"peft.rnak": [1]}}, r"axes: peft.rnak: unknown key \(did you mean 'rank'\?\)"),
    ({"init_from": "b", "axes": {"peft.rank": [0]}}, "rank must be >= 1"),
    ({"axes": {"peft.rank": [1]}}, "exactly one of 'pretrain'"),
    ({"init_from": "b", "axes": {"peft.rank": []}}, "non-empty list"),
    ({"init_from": "b", "axes": {"peft.rank": [1]}, "extra": 1}, r"unknown top-level key\(s\) \['extra'\]"),
])
def test_bad_grids_name_the_key(tmp_path, grid, match):
    with pytest.raises(ConfigError, match=match):
        load_grid(write(tmp_path, **grid))


def test_result_row_has_adapter_count_and_before_after(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rd.write_status(d, "done")
    rd.write_final(d, {"adapter_params": 123, "val_loss": 2.5, "wall_time_s": 9.0,
                       "eval_before": {"eval.t.acc": 0.3}, "eval_after": {"eval.t.acc": 0.5}})
    row = result_row("x", {"peft.rank": 2, "peft.layers": [0, 1]}, d)
    assert row == {"run": "x", "peft.rank": "2", "peft.layers": "0-1", "state": "done", "adapter_params": 123,
                   "val_loss": 2.5, "wall_time_s": 9.0, "before.t.acc": 0.3, "after.t.acc": 0.5}
