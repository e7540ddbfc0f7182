"""``python -m sweeps.run GRID --preflight``: memory and cost of every distinct model and mesh of a plan.

Runs that compile to the same train step (same model, mesh, batch, sequence
length, micro-batching and optimizer structure; seeds, token budgets and
learning rates don't matter) are one shape and are compiled once, by
``elmjax.preflight``. The table has one row per shape; a shape that does not
fit the device memory is an error naming its runs and bytes. Nothing is
written and nothing trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

from elmjax.config import Config, DataConfig
from elmjax.config_io import ConfigError, to_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preflight", action="store_true",
                   help="compile every distinct model and mesh of the plan, print memory and cost, train nothing")
    p.add_argument("--devices", type=int, metavar="N", help="with --preflight: compile for N fake CPU devices")
    p.add_argument("--hbm-gib", type=float, metavar="G", help="with --preflight: memory per device")
    p.add_argument("--accelerator", help="with --preflight: h100|h200|a100|v5e|v5p|v4|cpu (estimate and default memory)")


def program_config(config: Config) -> Config:
    """``config`` with everything that cannot change the compiled train step set to fixed values.

    Data source, seeds, token budget and learning-rate schedule values
    become constants; shapes, mesh, model and optimizer structure stay."""
    opt = dataclasses.replace(config.optimizer, lr=1e-3, warmup_steps=0, min_lr_ratio=0.1)
    train = dataclasses.replace(config.train, steps=1, tokens=None, seed=0, log_every=1, eval_every=1, progress=False)
    data = DataConfig(seq_len=config.data.seq_len, batch_size=config.data.batch_size)
    return config.replace(optimizer=opt, train=train, data=data, run_dir="", name="", compilation_cache="")


def shape_key(config: Config) -> str:
    d = to_dict(program_config(config))
    d.pop("checkpoint", None)
    return json.dumps(d, sort_keys=True)


@dataclass
class Shape:
    config: Config  # the program config that is compiled
    runs: list  # PlannedRun sharing it
    report: dict | None = None
    error: str | None = None


def group_runs(runs) -> list[Shape]:
    shapes: dict[str, Shape] = {}
    for run in runs:
        key = shape_key(run.config)
        if key not in shapes:
            shapes[key] = Shape(program_config(run.config), [])
        shapes[key].runs.append(run)
    return list(shapes.values())


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


HEADER = (f"{'shape':>5} {'runs':>4} {'L':>3} {'width':>5} {'params':>14} {'mesh d/f/t':>10} "
          f"{'params GiB':>10} {'opt GiB':>8} {'temp GiB':>8} {'total GiB':>9} {'fits':>4} "
          f"{'AG':>4} {'RS':>4} {'AR':>4} {'A2A':>4} {'CP':>4} {'compile s':>9} {'step ms':>8} {'MFU<=':>6}")


def format_row(i: int, s: Shape) -> str:
    """One table line; collective columns are static op counts (all-gather, reduce-scatter, ...)."""
    row = s.runs[0].row
    lead = f"{i:>5} {len(s.runs):>4} {row['num_layers']:>3} {row['model_dim']:>5} {row['params']:>14,}"
    if s.report is None:
        return f"{lead} error: {s.error}"
    r, pd, c = s.report, s.report["per_device"], s.report["collectives"]
    mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    e = r["estimate"]
    step = f"{1e3 * e['step_s']:>8.1f}" if e else f"{'n/a':>8}"
    mfu = f"{100 * e['mfu_ceiling']:>5.1f}%" if e and e["mfu_ceiling"] is not None else f"{'n/a':>6}"
    return (f"{lead} {mesh:>10} {_gib(pd['params_bytes']):>10} {_gib(pd['opt_state_bytes']):>8} "
            f"{_gib(pd['temp_bytes']):>8} {_gib(pd['total_bytes']):>9} {'yes' if r['fits'] else 'NO':>4} "
            f"{c['all-gather']['count']:>4} {c['reduce-scatter']['count']:>4} {c['all-reduce']['count']:>4} "
            f"{c['all-to-all']['count']:>4} {c['collective-permute']['count']:>4} {r['compile_s']:>9.1f} "
            f"{step} {mfu}")


def run_preflight(runs, devices: int | None = None, accelerator: str | None = None,
                  hbm_gib: float | None = None, out=None) -> int:
    """Compile each distinct shape once, print the table; 0 all fit, 1 some don't, 2 some can't compile."""
    from elmjax import preflight as pf

    out = out or sys.stdout  # looked up per call: a default bound at import goes stale under redirection

    if accelerator is not None and accelerator not in pf.ACCELERATOR_NAMES:
        print(f"error: --accelerator must be one of {', '.join(pf.ACCELERATOR_NAMES)}, got {accelerator!r}", file=sys.stderr)
        return 2
    try:
        if devices is not None:
            pf.force_host_devices(devices)
        pf.check_devices(devices)
    except pf.PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = accelerator or pf.default_accelerator()
    shapes = group_runs(runs)
    print(f"{HEADER}\n{'-' * len(HEADER)}", file=out, flush=True)
    for i, s in enumerate(shapes):  # a row as soon as its shape compiles: big models take minutes
        try:
            s.report = pf.report(s.config, pf.compile_step(s.config), acc, hbm_gib)
        except (pf.PreflightError, ConfigError) as e:
            s.error = str(e)
        print(format_row(i, s), file=out, flush=True)
    print(f"\n{len(runs)} runs, {len(shapes)} distinct shapes compiled, accelerator {acc}; per-device memory; "
          "AG/RS/AR/A2A/CP: collective ops in the compiled step", file=out)
    code = 0
    for i, s in enumerate(shapes):
        names = ", ".join(r.name for r in s.runs)
        if s.error is not None:
            print(f"error: shape {i} (runs {names}): {s.error}", file=sys.stderr)
            code = 2
        elif not s.report["fits"]:
            pd = s.report["per_device"]
            print(f"error: shape {i} (runs {names}) needs {pd['total_bytes']:,} bytes per device "
                  f"({_gib(pd['total_bytes'])} GiB), more than {s.report['hbm_bytes']:,} "
                  f"({_gib(s.report['hbm_bytes'])} GiB)", file=sys.stderr)
            code = max(code, 1)
    return code
