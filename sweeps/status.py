"""python -m sweeps.status SWEEP_DIR: the state and latest metrics of every run of a sweep.

Reads only the sweep directory (plan.json, each run's status.json, the tail
of its metrics.jsonl and its lock), never JAX, so it is quick to run on a
login node while the sweep trains elsewhere. ``--results`` also rewrites
results.parquet / results.csv from the run directories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from elmjax import run_dir as rd
from elmjax.run_times import TIME_KEYS, train_share
from sweeps.locks import holder
from sweeps.plan import read_plan
from sweeps.results import run_columns, write_results

_TAIL_BYTES = 1 << 16


def latest_metrics(run_dir: Path) -> dict:
    """The last train and eval rows of metrics.jsonl (read from its tail only: logs can be long)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - _TAIL_BYTES))
        lines = f.read().decode("utf-8", "replace").splitlines()
    out = {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a kill, or the first partial line of the tail
        out.setdefault(row.get("kind"), row)
        if "train" in out and "eval" in out:
            break
    return out


def status_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for planned in read_plan(sweep_dir):
        run_dir = sweep_dir / planned["run_dir"]
        state = run_columns(run_dir)
        status = rd.read_status(run_dir)
        latest = latest_metrics(run_dir)
        lock = holder(run_dir)
        rows.append({
            "run": planned["run"], "arm": planned["arm"], "budget": planned["budget"], "params": planned["params"],
            "state": state["status"], "step": status.get("step") or latest.get("train", {}).get("step"),
            "total": status.get("total_steps"), "loss": latest.get("train", {}).get("loss"),
            "val_loss": state["val_loss"] if state["val_loss"] is not None else latest.get("eval", {}).get("val_loss"),
            "error": state["error"], "where": f"{lock.get('host')}:{lock.get('pid')}" if lock else "",
            **{k: state[k] for k in ("wall_time_s",) + TIME_KEYS},
        })
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_time_shares(rows: list[dict]) -> str | None:
    """One line: where the wall time of the finished runs went (None if none recorded it)."""
    timed = [r for r in rows if r.get("wall_time_s") and r.get("train_s") is not None]
    if not timed:
        return None
    total = {k: sum(r[k] for r in timed) for k in ("wall_time_s",) + TIME_KEYS}
    wall = total["wall_time_s"]
    parts = ", ".join(f"{k[:-2]} {total[k] / wall:.0%}" for k in TIME_KEYS[:1] + TIME_KEYS[2:])
    return (f"time: {wall:,.0f} s in {len(timed)} finished run(s); training steps {total['train_s'] / wall:.0%} "
            f"of it ({parts})")


def format_status(rows: list[dict], errors: bool = False) -> str:
    name_w = max([len(r["run"]) for r in rows] + [3])
    arm_w = max([len(r["arm"]) for r in rows] + [3])
    head = (f"{'run':<{name_w}} {'arm':<{arm_w}} {'params':>14} {'state':<9} {'step':>13} {'loss':>7} "
            f"{'val_loss':>8} {'train%':>6}  where")
    lines = [head, "-" * len(head)]
    for r in rows:
        step = f"{_fmt(r['step'], 'd')}/{_fmt(r['total'], 'd')}" if r["step"] is not None or r["total"] else "-"
        lines.append(f"{r['run']:<{name_w}} {r['arm']:<{arm_w}} {r['params']:>14,} {r['state']:<9} {step:>13} "
                     f"{_fmt(r['loss'], '.3f'):>7} {_fmt(r['val_loss'], '.4f'):>8} "
                     f"{_fmt(train_share(r), '.0%'):>6}  {r['where']}")
        if errors and r["error"]:
            lines.append(f"    {r['error']}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append("\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" ({len(rows)} runs)")
    shares = format_time_shares(rows)
    if shares:
        lines.append(shares)
    if not errors and any(r["error"] and r["state"] in ("failed", "diverged") for r in rows):
        lines.append("(--errors shows why runs failed or diverged)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.status", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="a sweep directory (holds plan.json)")
    p.add_argument("--errors", action="store_true", help="show each failed or diverged run's error")
    p.add_argument("--results", action="store_true", help="also rewrite results.parquet and results.csv")
    args = p.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    try:
        rows = status_rows(sweep_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_status(rows, errors=args.errors))
    if args.results:
        print(f"wrote {write_results(sweep_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
