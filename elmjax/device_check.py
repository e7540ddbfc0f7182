"""GPU runbook: preflight, benchmark and 20 real training steps, then MFU, in a few minutes.

    python -m elmjax.device_check                      # OpenELM-1_1B, bf16, batch 8 x 2048, 20 steps
    python -m elmjax.device_check --model OpenELM-270M --batch 16 --remat

The first session on a new accelerator runs this once and records what it
prints. Three stages, each the command a user would type, each in its own
process (so one stage's preallocated GPU memory never starves the next):

1. ``python -m elmjax.preflight`` on the training config written to
   ``--out`` (memory, collectives, roofline estimate for this device);
2. ``python -m elmjax.bench`` with ``--bench`` arguments (default
   ``--preset OpenELM-1_1B --dtype bfloat16``);
3. ``python -m elmjax.train`` for ``--steps`` steps on the built-in corpus
   (the Python standard library, byte tokens: no download, no checkpoints).

The measured MFU is the trainer's own (``metrics.jsonl``), over the last
logging window, which starts after the first half of the steps and so leaves
compilation out. Exit status: 0 all stages ran (preflight may say the step
does not fit: that is reported, and training then shows what happens), 1 a
stage failed or training logged no measurement, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from elmjax import config_io, run_dir as rd
from elmjax.config import (CheckpointConfig, Config, DataConfig, ExecutionConfig, MeshConfig, OptimizerConfig,
                           TrainConfig)
from elmjax.layout import load_model_config

DEFAULT_BENCH = "--preset OpenELM-1_1B --dtype bfloat16"


def train_config(args, out: Path) -> Config:
    """The training config of stage 3 (and what preflight checks)."""
    steps = args.steps
    return Config(
        model=load_model_config(args.model),
        execution=ExecutionConfig(dtype=args.dtype, remat=args.remat),
        data=DataConfig(source="stdlib", tokenizer="byte", seq_len=args.seq_len, batch_size=args.batch,
                        val_sequences=args.batch, max_documents=args.max_documents),
        optimizer=OptimizerConfig(warmup_steps=min(10, steps)),
        # Two logging windows: the first holds compilation, the second is the measurement.
        train=TrainConfig(steps=steps, log_every=max(1, steps // 2), eval_every=steps, progress=False),
        checkpoint=CheckpointConfig(enabled=False),
        mesh=MeshConfig(data=-1),
        run_dir=str(out / f"train-{time.strftime('%Y%m%d-%H%M%S')}"),  # fresh: an old run would be "done"
        compilation_cache=str(out / "xla-cache"),
    )


def _stage(name: str, argv: list[str], timeout: float) -> tuple[int, float]:
    print(f"\n=== {name}: {shlex.join(argv)}", flush=True)
    t0 = time.time()
    try:
        rc = subprocess.run(argv, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"=== {name}: timed out after {timeout:.0f} s", flush=True)
        rc = 124
    dt = time.time() - t0
    print(f"=== {name}: exit {rc}, {dt:.0f} s", flush=True)
    return rc, dt


def measured(run_dir: str | Path) -> tuple[dict, int] | None:
    """The last train row of a run's metrics (tokens/s and MFU of its last logging window) and the window's first step."""
    rows = [r for r in rd.read_metrics(run_dir) if r.get("kind") == "train"]
    if len(rows) < 2:  # the first window includes compilation: no measurement
        return None
    return rows[-1], rows[-2]["step"] + 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m elmjax.device_check", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="OpenELM-1_1B", help="preset name or model YAML (default OpenELM-1_1B)")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="training steps (>= 2)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--remat", action="store_true", help="recompute layers in the backward pass")
    p.add_argument("--max-documents", type=int, default=2000, help="corpus files read (bounds data preparation)")
    p.add_argument("--bench", default=DEFAULT_BENCH, metavar="ARGS", help=f"elmjax.bench arguments ('{DEFAULT_BENCH}')")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    p.add_argument("--preflight-args", default="", metavar="ARGS", help="extra elmjax.preflight arguments")
    p.add_argument("--out", default="runs/device_check", help="config, compilation cache and training run")
    p.add_argument("--stage-timeout", type=float, default=600, metavar="S")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 2:
        print("error: --steps must be >= 2 (one logging window for compilation, one to measure)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    try:
        config = train_config(args, out)
    except (config_io.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg_path = out / "config.yaml"
    config_io.atomic_write_text(cfg_path, config_io.dump_yaml(config))
    py = sys.executable
    stages = [("preflight", [py, "-m", "elmjax.preflight", str(cfg_path), *shlex.split(args.preflight_args)])]
    if not args.no_bench:
        stages.append(("bench", [py, "-m", "elmjax.bench", *shlex.split(args.bench)]))
    stages.append(("train", [py, "-m", "elmjax.train", str(cfg_path)]))
    t0, results = time.time(), {}
    for name, cmd in stages:
        results[name] = _stage(name, cmd, args.stage_timeout)
    rows = measured(config.run_dir)
    print(f"\n=== device check summary ({time.time() - t0:.0f} s)")
    for name, (rc, dt) in results.items():
        note = " (does not fit)" if name == "preflight" and rc == 1 else ""
        print(f"  {name:<9} exit {rc}{note}, {dt:.0f} s")
    if rows is None:
        print("  train: no measurement (see the output above)")
    else:
        row, first = rows
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a (no published peak for this device)"
        print(f"  train: {row['tokens_per_s']:,.0f} tokens/s over steps {first}-{row['step']}, MFU {mfu}, "
              f"loss {row['loss']:.3f}  ({config.run_dir})")
    # preflight exits 1 when the step would not fit: reported above, not a failure of the check itself
    failed = [n for n, (rc, _) in results.items() if rc != 0 and not (n == "preflight" and rc == 1)]
    return 1 if failed or rows is None else 0


if __name__ == "__main__":
    sys.exit(main())
