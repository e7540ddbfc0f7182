"""Downstream evaluation of finished runs: the grid's ``eval: {tasks: [...]}``.

Each finished run is scored on local multiple-choice JSONL task files with
``elmjax.evaluate`` (zero-shot ``acc`` / ``acc_norm``, as the LM Evaluation
Harness scores ``multiple_choice`` tasks) and the scores are written to
``<run_dir>/eval.json``; the results table turns them into
``eval.<task>.acc`` / ``eval.<task>.acc_norm`` columns. Evaluation is not
part of a run's identity: adding tasks to a finished sweep and rerunning it
scores the finished runs without retraining them.

Task files are checked when the grid is loaded (pure Python); scoring
imports JAX, only in ``evaluate_run``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from elmjax.config_io import atomic_write_text

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...] = ()  # JSONL files, one {"context", "choices", "gold"} per line
    token_budget: int | None = None  # tokens per scoring batch (memory vs speed); None: elmjax's default
    dtype: str | None = None  # compute dtype for scoring; None: the run's


def check_tasks(spec: EvalSpec) -> list[str]:
    """Problems with the task files, as '<where>: <reason>' (nothing is scored)."""
    from elmjax.evaluate import TaskFileError, load_task

    problems, names = [], {}
    for i, f in enumerate(spec.tasks):
        where = f"eval.tasks[{i}]"
        if not Path(f).expanduser().is_file():
            problems.append(f"{where}: no such task file '{f}'")
            continue
        name = Path(f).stem
        if name in names:
            problems.append(f"{where}: task name '{name}' (the file stem) is also eval.tasks[{names[name]}]")
        names.setdefault(name, i)
        try:
            load_task(Path(f).expanduser())
        except TaskFileError as e:
            problems.append(f"{where}: {e}")
    return problems


def read_eval(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / EVAL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def needs_eval(run_dir: str | Path, spec: EvalSpec) -> bool:
    """A finished run lacks scores for the grid's current task files."""
    if not spec.tasks:
        return False
    record = read_eval(run_dir)
    return record is None or record.get("files") != [str(Path(f).expanduser().resolve()) for f in spec.tasks]


def evaluate_run(run_dir: str | Path, spec: EvalSpec) -> dict:
    """Score the run's final checkpoint on the task files; writes and returns the eval.json record."""
    from elmjax.evaluate import evaluate_tasks
    from elmjax.generate import load_for_inference

    files = [str(Path(f).expanduser().resolve()) for f in spec.tasks]
    model, tokenizer = load_for_inference(run_dir, None, spec.dtype)
    results = evaluate_tasks(model, tokenizer, files, token_budget=spec.token_budget)
    # JSON has no NaN (the stderr of a one-question task): write null.
    tasks = {t: {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in r.items()}
             for t, r in results.items()}
    record = {"files": files, "tokenizer": tokenizer.spec, "tasks": tasks}
    atomic_write_text(Path(run_dir) / EVAL_FILE, json.dumps(record, indent=1) + "\n")
    return record


def eval_columns(run_dir: str | Path) -> dict:
    """``eval.<task>.acc`` / ``eval.<task>.acc_norm`` of a run (empty if it was not evaluated)."""
    from elmjax.evaluate import METRICS

    record = read_eval(run_dir)
    if not record:
        return {}
    return {f"eval.{task}.{m}": r.get(m) for task, r in record.get("tasks", {}).items() for m in METRICS}
