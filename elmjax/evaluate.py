"""Zero-shot multiple-choice evaluation on local JSONL task files.

A task file holds one question per line::

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0}

Each choice is scored as the continuation of the context (the strings are
concatenated as they are: put the separating space in the choices, as the
harness's ``target_delimiter`` does), exactly as the LM Evaluation Harness
scores ``multiple_choice`` tasks. Reported per task (name = file stem):
``acc``, ``acc_norm`` (log-likelihood per UTF-8 byte of the choice), their
standard errors and ``n``.

    python -m elmjax.evaluate --checkpoint PATH --tasks arc_easy.jsonl piqa.jsonl [--out results.json]

Sweeps call ``evaluate_tasks(model, tokenizer, task_files)`` and
``as_columns(results)`` for their ``eval.<task>.acc`` / ``eval.<task>.acc_norm`` columns.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from elmjax.cli import positive_int
from elmjax.config_io import atomic_write_text
from elmjax.errors import UserError

METRICS = ("acc", "acc_norm")


class TaskFileError(UserError):
    """A task file is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    gold: int


def _parse_line(obj, where: str) -> Example:
    if not isinstance(obj, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("context", "choices", "gold"):
        if key not in obj:
            raise TaskFileError(f"{where}: missing field '{key}' (each line needs context, choices, gold)")
    context, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(context, str):
        raise TaskFileError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise TaskFileError(f"{where}: 'choices' must be a list of at least 2 strings")
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise TaskFileError(f"{where}: choices[{j}] must be a non-empty string, got {c!r}")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise TaskFileError(f"{where}: 'gold' must be an integer index into choices, got {gold!r}")
    if not 0 <= gold < len(choices):
        raise TaskFileError(f"{where}: gold {gold} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    return Example(context, tuple(choices), gold)


def load_task(path: str | Path) -> list[Example]:
    """Every example of a JSONL task file; raises TaskFileError naming file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"{path}: cannot read task file ({e})") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        examples.append(_parse_line(obj, f"{path}:{n}"))
    if not examples:
        raise TaskFileError(f"{path}: no examples (empty task file)")
    return examples


def load_tasks(task_files: Sequence[str | Path]) -> dict[str, list[Example]]:
    """Task name (file stem) -> examples, all files checked before any scoring."""
    tasks: dict[str, list[Example]] = {}
    for f in task_files:
        name = Path(f).stem
        if name in tasks:
            raise TaskFileError(f"{f}: task name '{name}' is used by two files; task names are file stems")
        tasks[name] = load_task(f)
    if not tasks:
        raise TaskFileError("no task files given")
    return tasks


def _summarise(per_example: list[dict[str, float]]) -> dict[str, float]:
    from elmjax.scoring import mean_stderr

    out: dict[str, float] = {}
    for m in METRICS:
        out[m], out[f"{m}_stderr"] = mean_stderr([r[m] for r in per_example])
    out["n"] = len(per_example)
    return out


def evaluate_tasks(model, tokenizer, task_files: Sequence[str | Path], *, token_budget: int | None = None,
                   prefix_token: int | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}} for local JSONL task files.

    All questions of all tasks are scored in one batched pass. ``prefix_token``
    (default: the tokenizer's EOS) stands in for an empty context."""
    from elmjax.scoring import DEFAULT_TOKEN_BUDGET, choice_metrics, encode_pair, loglikelihood

    tasks = load_tasks(task_files)
    requests = [encode_pair(tokenizer, ex.context, c, prefix_token)
                for examples in tasks.values() for ex in examples for c in ex.choices]
    scored = loglikelihood(model, requests, token_budget=token_budget or DEFAULT_TOKEN_BUDGET, progress=progress)
    lls = iter(r.logprob for r in scored)
    results = {}
    for name, examples in tasks.items():
        per_example = [choice_metrics([next(lls) for _ in ex.choices], ex.choices, ex.gold) for ex in examples]
        results[name] = _summarise(per_example)
    return results


def as_columns(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The sweep results-table columns: ``eval.<task>.acc`` and ``eval.<task>.acc_norm``."""
    return {f"eval.{task}.{m}": float(r[m]) for task, r in results.items() for m in METRICS}


def format_table(results: dict[str, dict[str, float]]) -> str:
    def cell(r, m):
        se = r[f"{m}_stderr"]
        return f"{r[m]:.4f} ± {se:.4f}" if math.isfinite(se) else f"{r[m]:.4f}"

    width = max(4, *(len(k) for k in results))
    lines = [f"{'task':<{width}}  {'n':>6}  {'acc':<17}  acc_norm"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {int(r['n']):>6}  {cell(r, 'acc'):<17}  {cell(r, 'acc_norm')}")
    return "\n".join(lines)


def _json_safe(results):
    # JSON has no NaN (stderr of a one-question task): write null.
    return {t: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for t, r in results.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elmjax.evaluate", description="Zero-shot multiple-choice accuracy on local JSONL tasks.")
    p.add_argument("--checkpoint", required=True, help="training run directory or Hugging Face OpenELM directory")
    p.add_argument("--tasks", nargs="+", required=True, help='JSONL files, one {"context", "choices", "gold"} per line')
    p.add_argument("--tokenizer", default=None, help="byte | sentencepiece:PATH | hf:PATH (default: the checkpoint's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--token-budget", type=positive_int, default=None, help="tokens per scoring batch (memory vs speed)")
    p.add_argument("--adapter", default=None, help="apply the LoRA/DoRA adapter in this PEFT-layout directory (elmjax.peft_io)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    from elmjax.generate import load_for_inference, user_errors

    try:
        # Bad task files and a bad --out fail before the model loads.
        load_tasks(args.tasks)
        if args.out and Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: is a directory; give the path of the JSON file to write")
        model, tok = load_for_inference(args.checkpoint, args.tokenizer, args.dtype)
        if args.adapter:
            from elmjax.peft_io import load_adapters, with_adapters

            model = with_adapters(model, *load_adapters(args.adapter, model.cfg))
        results = evaluate_tasks(model, tok, args.tasks, token_budget=args.token_budget, progress=True)
        print(format_table(results))
        if args.out:
            record = {"checkpoint": str(args.checkpoint), "tokenizer": tok.spec, "tasks": _json_safe(results)}
            atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
