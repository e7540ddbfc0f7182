"""python -m sweeps.example_tasks [OUT_DIR]: the two small example task files shipped in sweeps/tasks/.

Both are synthetic multiple-choice tasks (``{"context", "choices", "gold"}``
per line, as ``elmjax.evaluate`` reads them) about Python syntax, which is
what a small model trained on the built-in corpus (the Python standard
library, ``data.source: stdlib``) can learn. They are made for trying the
``eval:`` section of a grid and the accuracy part of the report, not as
benchmarks: the questions are short, templated and easy for any model that
has learned Python's surface syntax, and chance is 1/3.

* ``close_bracket``: a line of Python with nested open brackets; which of
  ``)``, ``]``, ``}`` closes the innermost one.
* ``block_colon``: the header of a compound statement (``for``, ``if``,
  ``def``, ``class``, ``while``, ``with``, ``except``, ``elif``); which of
  ``:`` and two of ``;``, ``{``, ``=`` follows it.

Every choice is one character, so plain ``acc`` (summed log-likelihood) is
not decided by the choices' lengths.

The files are generated from a fixed seed, so rerunning this module
rewrites them byte for byte (a test checks that). Pure Python.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
N_EXAMPLES = 120
SEED = 20241

NAMES = ("items", "values", "data", "result", "name", "path", "line", "key", "value", "count", "index", "text",
         "node", "parts", "args", "options", "entry", "record", "size", "total", "offset", "prefix", "token")
FUNCS = ("len", "sorted", "list", "str", "int", "max", "min", "sum", "tuple", "repr", "isinstance", "getattr")
CLASSES = ("Parser", "Reader", "Buffer", "Config", "Handler", "Node", "Entry", "Cache", "Record", "Stream")
BASES = ("object", "Exception", "dict", "ValueError", "Base", "Mixin")
ERRORS = ("ValueError", "KeyError", "OSError", "TypeError", "IndexError", "AttributeError")
CLOSE = {"(": ")", "[": "]", "{": "}"}
WRONG_AFTER_HEADER = (";", "{", "=")


def _atom(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(NAMES)
    if kind == 1:
        return str(rng.randrange(100))
    return repr(rng.choice(NAMES))


def _open(rng: random.Random, bracket: str) -> str:
    """An opening bracket with what usually precedes it, and the items already inside it."""
    if bracket == "(":
        head = f"{rng.choice(FUNCS)}("
    elif bracket == "[":
        head = "[" if rng.random() < 0.5 else f"{rng.choice(NAMES)}["
    else:
        head = "{" + f"{_atom(rng) if rng.random() < 0.3 else repr(rng.choice(NAMES))}: "
    if bracket == "{":
        return head
    return head + ", ".join(_atom(rng) for _ in range(rng.randrange(1, 3)))


def close_bracket(rng: random.Random) -> dict:
    stack = [rng.choice("([{") for _ in range(rng.randrange(1, 4))]
    parts = []
    for i, bracket in enumerate(stack):
        parts.append(_open(rng, bracket))
        last = i + 1 == len(stack)
        if bracket == "{" and last:
            parts.append(_atom(rng))  # the value of the open key
        elif bracket != "{" and not last:
            parts.append(", ")  # the next bracket is another item
    context = f"{rng.choice(NAMES)} = {''.join(parts)}"
    choices = [")", "]", "}"]
    return {"context": context, "choices": choices, "gold": choices.index(CLOSE[stack[-1]])}


def _header(rng: random.Random) -> str:
    """The header of a compound statement, up to where its ':' goes."""
    v, w = rng.sample(NAMES, 2)
    kind = rng.randrange(8)
    if kind == 0:
        return f"for {v} in {w}"
    if kind == 1:
        return f"if {v} == {rng.randrange(10)}"
    if kind == 2:
        return f"def {rng.choice(('load', 'parse', 'read', 'get', 'update'))}_{v}(self, {w})"
    if kind == 3:
        return f"class {rng.choice(CLASSES)}({rng.choice(BASES)})"
    if kind == 4:
        return f"while {v} < {rng.randrange(1, 100)}"
    if kind == 5:
        return f"with open({v}) as {w}"
    if kind == 6:
        return f"except {rng.choice(ERRORS)} as {rng.choice(('e', 'exc', 'err'))}"
    return f"elif {v} is None"


def block_colon(rng: random.Random) -> dict:
    header = _header(rng)
    indent = "    " * rng.randrange(3)
    # Single characters that cannot follow the header, so every choice has the same length and
    # accuracy on summed log-likelihoods is not decided by length.
    choices = [":", *rng.sample(WRONG_AFTER_HEADER, 2)]
    rng.shuffle(choices)
    return {"context": f"{indent}{header}", "choices": choices, "gold": choices.index(":")}


TASKS = {"close_bracket": close_bracket, "block_colon": block_colon}


def task_text(name: str) -> str:
    rng = random.Random(f"{SEED}:{name}")
    make = TASKS[name]
    return "".join(json.dumps(make(rng)) + "\n" for _ in range(N_EXAMPLES))


def write_tasks(out_dir: str | Path = TASKS_DIR) -> list[Path]:
    from elmjax.config_io import atomic_write_text

    out_dir = Path(out_dir)
    paths = []
    for name in TASKS:
        atomic_write_text(out_dir / f"{name}.jsonl", task_text(name))
        paths.append(out_dir / f"{name}.jsonl")
    return paths


if __name__ == "__main__":
    for p in write_tasks(sys.argv[1] if len(sys.argv) > 1 else TASKS_DIR):
        print(f"wrote {p}")
