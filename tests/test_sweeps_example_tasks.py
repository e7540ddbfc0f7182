"""The shipped example task files: reproducible, valid, and what the README's example grid uses."""

from pathlib import Path

import pytest

from elmjax.evaluate import load_task
from sweeps import run
from sweeps.example_tasks import TASKS, TASKS_DIR, task_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_task_files_are_valid_and_regenerate_byte_for_byte(name):
    path = TASKS_DIR / f"{name}.jsonl"
    assert path.read_text() == task_text(name), f"rerun `python -m sweeps.example_tasks` to refresh {path}"
    examples = load_task(path)
    assert len(examples) >= 100
    assert all(len(ex.choices) == 3 for ex in examples)
    assert len({ex.gold for ex in examples}) == 3  # the answer is not always in one position


def test_readme_example_grid_validates_and_dry_runs_with_the_shipped_tasks(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    block = text.split("### Grid files", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "sweeps/tasks/close_bracket.jsonl" in block and "sweeps/tasks/block_colon.jsonl" in block
    grid = tmp_path / "readme_example.yaml"
    grid.write_text(block)
    monkeypatch.chdir(ROOT)  # task paths are relative to where the sweep is started: the repository root
    assert run.main([str(grid), "--dry-run"]) == 0, capsys.readouterr().err
    assert "84 runs" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(TASKS))
def test_choices_of_a_question_have_one_length_so_plain_acc_is_not_a_length_contest(name):
    """acc sums log-likelihoods over the choice: a 1-byte answer among 3-byte distractors wins untrained."""
    for ex in load_task(TASKS_DIR / f"{name}.jsonl"):
        assert len({len(c.encode()) for c in ex.choices}) == 1, ex
