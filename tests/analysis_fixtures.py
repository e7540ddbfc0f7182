"""Synthetic sweep directories, written exactly per the run/sweep-directory contract.

Losses come from known laws so tests can check what the analysis recovers:
every run of arm ``m`` at ``N`` parameters and ``D`` tokens has

    val_loss = E + A / (mult[m] * N)^alpha + B / D^beta      (times exp(noise))

i.e. arm ``m`` behaves like a uniform model with ``mult[m]`` times the
parameters (its true effective-parameter multiplier), and

    val_acc = ACC_A / (1 + exp(-ACC_K (val_loss - ACC_L0))) + ACC_B.

Configs are real ``elmjax.config.Config`` objects, so config.yaml, the layout
columns (q_heads/kv_heads/ffn_dims) and the parameter/FLOP counts are the
ones the trainer and the sweep driver would write. Pure Python + numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from elmjax import config_io, run_dir as rd
from elmjax.config import CheckpointConfig, Config, DataConfig, TrainConfig
from elmjax.layout import layer_layout, layer_multipliers, param_counts, train_flops_per_token
from elmjax.model_config import ModelConfig

LAW = {"E": 1.0, "A": 30.0, "alpha": 0.3, "B": 50.0, "beta": 0.3}
ACC = {"a": 0.6, "k": -4.0, "L0": 3.1, "b": 0.05}
# name -> (qkv multipliers, ffn multipliers, schedule)
ARMS = {
    "openelm": ((0.5, 1.0), (0.5, 4.0), "linear"),
    "reverse": ((0.5, 1.0), (0.5, 4.0), "reverse"),
    "middle": ((0.5, 1.0), (0.5, 4.0), "middle"),
    "a0.25-1.0_b1.0-3.0": ((0.25, 1.0), (1.0, 3.0), "linear"),
    "a0.5-1.5_b1.0-3.0": ((0.5, 1.5), (1.0, 3.0), "linear"),
    "a0.25-1.0_b0.5-4.0": ((0.25, 1.0), (0.5, 4.0), "linear"),
    "a0.5-1.5_b0.5-4.0": ((0.5, 1.5), (0.5, 4.0), "linear"),
}
MULT = {"uniform": 1.0, "openelm": 1.3, "reverse": 0.8, "middle": 1.05, "a0.25-1.0_b1.0-3.0": 1.1,
        "a0.5-1.5_b1.0-3.0": 0.95, "a0.25-1.0_b0.5-4.0": 1.2, "a0.5-1.5_b0.5-4.0": 1.0}
STEPS, BATCH, SEQ = 300, 8, 64


@dataclass
class SweepSpec:
    budgets: tuple[float, ...] = (1.5e5, 2.5e5, 4.0e5)
    arms: tuple[str, ...] = ("openelm",)
    seeds: tuple[int, ...] = (0, 1)
    noise: float = 0.004  # log-normal sd of each run's loss
    rng_seed: int = 0
    failed: tuple[tuple[str, float, int], ...] = ()  # (arm, budget, seed) that failed
    diverged: tuple[tuple[str, float, int], ...] = ()
    pending: tuple[tuple[str, float, int], ...] = ()
    eval_tasks: tuple[str, ...] = ()
    mult: dict = field(default_factory=lambda: dict(MULT))
    results: tuple[str, ...] = ("parquet", "csv")  # which results files to write
    curves: bool = True


def _model(dim: int, qkv, ffn, schedule: str) -> ModelConfig:
    return ModelConfig(num_layers=4, model_dim=dim, head_dim=16, num_gqa_groups=2, qkv_multipliers=qkv,
                       ffn_multipliers=ffn, qkv_schedule=schedule, ffn_schedule=schedule, ffn_dim_divisor=16)


def _closest(budget: float, qkv, ffn, schedule: str) -> ModelConfig:
    dims = range(32, 1024, 16)
    return min((_model(d, qkv, ffn, schedule) for d in dims), key=lambda m: abs(param_counts(m).total - budget))


def _twin_of(qkv, ffn, schedule: str, budget: float) -> ModelConfig:
    L = 4
    a = float(np.mean(layer_multipliers(qkv, schedule, L)))
    b = float(np.mean(layer_multipliers(ffn, schedule, L)))
    return _closest(budget, round(a, 4), round(b, 4), "linear")


def _config(model: ModelConfig, seed: int, name: str, steps: int = STEPS) -> Config:
    return Config(model=model, data=DataConfig(seq_len=SEQ, batch_size=BATCH, seed=seed),
                  train=TrainConfig(steps=steps, seed=seed, progress=False), checkpoint=CheckpointConfig(enabled=False),
                  run_dir=f"runs/{name}", name=name)


def _hash(model: ModelConfig, seed: int, steps: int) -> str:
    text = json.dumps([config_io.to_dict(model), seed, steps], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def true_loss(n_params: float, tokens: float, mult: float = 1.0) -> float:
    return LAW["E"] + LAW["A"] * (mult * n_params) ** -LAW["alpha"] + LAW["B"] * tokens ** -LAW["beta"]


def true_acc(loss: float) -> float:
    return ACC["a"] / (1.0 + math.exp(-ACC["k"] * (loss - ACC["L0"]))) + ACC["b"]


def _layout_columns(model: ModelConfig) -> dict:
    lay = layer_layout(model)
    alphas = layer_multipliers(model.qkv_multipliers, model.qkv_schedule, model.num_layers)
    betas = layer_multipliers(model.ffn_multipliers, model.ffn_schedule, model.num_layers)
    counts = param_counts(model)
    return {"num_layers": model.num_layers, "model_dim": model.model_dim, "head_dim": model.head_dim,
            "num_gqa_groups": model.num_gqa_groups, "qkv_schedule": model.qkv_schedule,
            "ffn_schedule": model.ffn_schedule, "alpha_min": min(alphas), "alpha_max": max(alphas),
            "beta_min": min(betas), "beta_max": max(betas),
            "q_heads": json.dumps([x.q_heads for x in lay]), "kv_heads": json.dumps([x.kv_heads for x in lay]),
            "ffn_dims": json.dumps([x.ffn_dim for x in lay]), "params": counts.total,
            "non_embedding_params": counts.non_embedding}


def _write_run(sweep: Path, row: dict, cfg: Config, state: str, spec: SweepSpec, rng) -> None:
    run = sweep / row["run_dir"]
    run.mkdir(parents=True, exist_ok=True)
    config_io.atomic_write_text(run / "config.yaml", config_io.dump_yaml(cfg))
    if state == "pending":
        return
    steps = cfg.total_steps
    final_step = steps if state == "done" else steps // 3
    rd.write_status(run, state, step=final_step, total_steps=steps,
                    error={"failed": "RuntimeError: out of memory", "diverged": "loss became NaN at step 100"}.get(state))
    if spec.curves:
        log = rd.MetricsLog(run)
        tps = cfg.tokens_per_step
        target = row["val_loss"] if state == "done" else 3.0
        for step in range(10, final_step + 1, 10):
            loss = target + (5.5 - target) * math.exp(-step / 60.0) + rng.normal(0, 0.01)
            log.write({"kind": "train", "step": step, "tokens": step * tps, "loss": loss, "lr": 3e-3,
                       "grad_norm": 1.0, "tokens_per_s": 1e4, "mfu": 0.01, "batch_fingerprint": "0" * 8,
                       "time": float(step)})
            if step % 100 == 0:
                vl = target + (5.5 - target) * math.exp(-step / 60.0)
                log.write({"kind": "eval", "step": step, "tokens": step * tps, "val_loss": vl,
                           "val_ppl": math.exp(vl), "val_bpb": vl / math.log(2), "val_acc": true_acc(vl),
                           "time": float(step)})
        if state == "diverged":
            log.write({"kind": "train", "step": final_step + 1, "tokens": (final_step + 1) * tps, "loss": float("nan"),
                       "lr": 3e-3, "grad_norm": float("inf"), "time": float(final_step + 1)})
        log.close()
    if state == "done":
        final = {k: row[k] for k in ("val_loss", "val_ppl", "val_bpb", "val_acc", "train_loss", "wall_time_s",
                                     "params", "non_embedding_params", "flops_per_token")}
        final.update(step=final_step, tokens=row["tokens"])
        if spec.eval_tasks:
            final["eval"] = {t: {"acc": row[f"eval.{t}.acc"]} for t in spec.eval_tasks}
        rd.write_final(run, final)


def _row(model: ModelConfig, arm: str, budget: float, seed: int, kind: str, spec: SweepSpec, rng,
         steps: int = STEPS) -> tuple[dict, Config]:
    label = "uniform" if arm == "uniform" else arm
    name = f"{label}-{budget:.3g}-s{seed}-{_hash(model, seed, steps)}"
    cfg = _config(model, seed, name, steps)
    cols = _layout_columns(model)
    fpt = train_flops_per_token(model, SEQ)
    tokens = cfg.total_steps * cfg.tokens_per_step
    achieved = {"params": cols["params"], "non_embedding_params": cols["non_embedding_params"],
                "flops": float(fpt) * tokens}[kind]
    loss = true_loss(cols["params"], tokens, spec.mult[arm]) * math.exp(rng.normal(0, spec.noise))
    row = {"run": name, "run_dir": f"runs/{name}", "status": "done", "error": None, "arm": arm,
           "is_uniform": arm == "uniform", "twin": None, "budget_kind": kind, "budget": float(budget),
           "budget_rel_error": (achieved - budget) / budget, "seed": seed, **cols, "flops_per_token": fpt,
           "tokens": tokens, "train_flops": float(fpt) * tokens, "lr": 3e-3, "seq_len": SEQ, "batch_size": BATCH,
           "val_loss": loss, "val_ppl": math.exp(loss), "val_bpb": loss / math.log(2),
           "val_acc": true_acc(loss) + rng.normal(0, 0.003), "train_loss": loss - 0.02,
           "final_step": cfg.total_steps, "tokens_seen": tokens, "wall_time_s": 12.5,
           "axis.budget": float(budget), "axis.seed": seed, "axis.allocation": arm}
    for task in spec.eval_tasks:
        row[f"eval.{task}.acc"] = 0.25 + 0.5 / (1.0 + math.exp(8.0 * (loss - 3.1))) + rng.normal(0, 0.01)
    return row, cfg


def _apply_state(row: dict, key, spec: SweepSpec) -> str:
    for state in ("failed", "diverged", "pending"):
        if key in getattr(spec, state):
            row["status"] = state
            row["error"] = {"failed": "RuntimeError: out of memory", "diverged": "loss became NaN at step 100"}.get(state)
            for k in ("val_loss", "val_ppl", "val_bpb", "val_acc", "train_loss", "final_step", "tokens_seen",
                      "wall_time_s") + tuple(f"eval.{t}.acc" for t in spec.eval_tasks):
                row[k] = None
            return state
    return "done"


def write_sweep(root: str | Path, spec: SweepSpec | None = None, **kw) -> Path:
    """A parameter-budget sweep: every arm at every budget and seed, each with its uniform twin."""
    spec = spec or SweepSpec(**kw)
    rng = np.random.default_rng(spec.rng_seed)
    sweep = Path(root)
    sweep.mkdir(parents=True, exist_ok=True)
    config_io.atomic_write_text(sweep / "grid.yaml", "name: fixture\naxes: {}\n")
    rows: dict[str, tuple[dict, Config, str]] = {}
    for budget in spec.budgets:
        for seed in spec.seeds:
            for arm in spec.arms:
                qkv, ffn, schedule = ARMS[arm]
                twin_row, twin_cfg = _row(_twin_of(qkv, ffn, schedule, budget), "uniform", budget, seed, "params",
                                          spec, rng)
                if twin_row["run"] not in rows:  # arms with equal mean multipliers share a twin
                    rows[twin_row["run"]] = (twin_row, twin_cfg, _apply_state(twin_row, ("uniform", budget, seed), spec))
                row, cfg = _row(_closest(budget, qkv, ffn, schedule), arm, budget, seed, "params", spec, rng)
                row["twin"] = twin_row["run"]
                rows[row["run"]] = (row, cfg, _apply_state(row, (arm, budget, seed), spec))
    return _finish(sweep, list(rows.values()), spec, rng)


def write_isoflop_sweep(root: str | Path, budgets=(1e12, 3e12, 1e13), dims=(32, 48, 64, 96, 128, 176, 256),
                        seeds=(0,), noise: float = 0.003, rng_seed: int = 0) -> Path:
    """A uniform-only FLOP-budget sweep: several model sizes per budget, tokens = C / FLOPs per token."""
    spec = SweepSpec(budgets=tuple(budgets), arms=(), seeds=tuple(seeds), noise=noise, rng_seed=rng_seed)
    rng = np.random.default_rng(rng_seed)
    sweep = Path(root)
    sweep.mkdir(parents=True, exist_ok=True)
    config_io.atomic_write_text(sweep / "grid.yaml", "name: isoflop-fixture\naxes: {}\n")
    rows = []
    for budget in budgets:
        for dim in dims:
            model = _model(dim, 0.75, 2.25, "linear")
            steps = max(1, round(budget / train_flops_per_token(model, SEQ) / (BATCH * SEQ)))
            for seed in seeds:
                row, cfg = _row(model, "uniform", budget, seed, "flops", spec, rng, steps=steps)
                rows.append((row, cfg, "done"))
    return _finish(sweep, rows, spec, rng)


def _finish(sweep: Path, rows, spec: SweepSpec, rng) -> Path:
    for row, cfg, state in rows:
        _write_run(sweep, row, cfg, state, spec, rng)
    df = pd.DataFrame([r for r, _, _ in rows])
    for col in ("seed", "num_layers", "model_dim", "head_dim", "num_gqa_groups", "params", "non_embedding_params",
                "flops_per_token", "tokens", "seq_len", "batch_size", "final_step", "tokens_seen"):
        df[col] = df[col].astype("Int64")
    if "parquet" in spec.results:
        df.to_parquet(sweep / "results.parquet", index=False)
    if "csv" in spec.results:
        df.to_csv(sweep / "results.csv", index=False)
    return sweep
