"""Train-step benchmark: layer-wise OpenELM vs a uniform model of the same size.

    python -m elmjax.bench                       # small CPU-sized default
    python -m elmjax.bench --preset OpenELM-270M --batch 16 --seq-len 2048 --dtype bfloat16
    python -m elmjax.bench --config elmjax/configs/tiny_cpu.yaml --batch 16 --seq-len 128

Both models are measured in this one process, alternating, so machine noise
hits both; the printed ratio (layer-wise tokens/s over uniform tokens/s) is
the number to compare. MFU uses the analytic FLOPs of ``elmjax.layout`` and
the peak of ``elmjax.hardware`` (measured once on CPUs). Then the layer-wise
model's step is broken down by component (``elmjax.breakdown``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from elmjax import budget_match
from elmjax.config import Config, ExecutionConfig, MeshConfig, OptimizerConfig, TrainConfig
from elmjax import config_io
from elmjax.breakdown import component_times, format_breakdown
from elmjax.cpu_heap import keep_scratch_in_heap
from elmjax.hardware import mfu, peak_flops
from elmjax.layout import layer_layout, layer_multipliers, param_counts, train_flops_per_token
from elmjax.model_config import ModelConfig, preset
from elmjax.optim import lr_schedule
from elmjax.sharding import batch_sharding, make_mesh
from elmjax.state import abstract_model, model_optimizer, state_layout
from elmjax.train_step import make_train_step

SMALL = ModelConfig(num_layers=8, model_dim=256, head_dim=32, num_gqa_groups=2, ffn_dim_divisor=64, vocab_size=4096)


def uniform_twin(cfg: ModelConfig) -> ModelConfig:
    """The uniform twin a params-budget sweep would train next to ``cfg`` at
    its parameter count: one solver for both (``elmjax.budget_match``)."""
    return budget_match.uniform_twin(cfg).model


def describe_arm(cfg: ModelConfig) -> str:
    """'model_dim 256, alpha 0.5-1.0 (linear), beta 0.5-4.0 (linear)': which model was measured."""
    def span(value, schedule):
        per_layer = layer_multipliers(value, schedule, cfg.num_layers)
        lo, hi = min(per_layer), max(per_layer)
        return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g} ({schedule})"

    return (f"model_dim {cfg.model_dim}, alpha {span(cfg.qkv_multipliers, cfg.qkv_schedule)}, "
            f"beta {span(cfg.ffn_multipliers, cfg.ffn_schedule)}")


@dataclass
class _Arm:
    """One compiled train step and the state it advances."""

    compiled: object
    state: object
    tokens: jax.Array
    compile_s: float
    num_devices: int


def _compile(cfg: ModelConfig, execution: ExecutionConfig, batch: int, seq_len: int) -> _Arm:
    mesh = make_mesh(MeshConfig(data=-1))
    config = Config(model=cfg, optimizer=OptimizerConfig(warmup_steps=2), train=TrainConfig(steps=1000),
                    execution=execution)
    layout = state_layout(config, mesh)
    state = jax.jit(layout.create, out_shardings=layout.shardings)()
    graphdef, _ = abstract_model(cfg, **execution.model_kwargs)
    step = make_train_step(graphdef, layout.optimizer, lr_schedule(config.optimizer, config.total_steps),
                           z_loss=0.0, grad_accum=1, mesh=mesh)
    bsh = batch_sharding(mesh)
    tokens = jax.device_put(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32), bsh)
    t0 = time.perf_counter()
    compiled = jax.jit(step, in_shardings=(layout.shardings, bsh), out_shardings=(layout.shardings, None),
                       donate_argnums=0).lower(state, tokens).compile()
    return _Arm(compiled, state, tokens, time.perf_counter() - t0, mesh.size)


def _peak_memory(compiled) -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)


def _time(compiled, state, tokens, steps: int):
    state, m = compiled(state, tokens)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, tokens)
    jax.block_until_ready(m)
    return time.perf_counter() - t0, state


def bench(cfg: ModelConfig, execution: ExecutionConfig, batch: int, seq_len: int, steps: int,
          rounds: int) -> dict[str, dict]:
    arms = {"layer-wise": cfg, "uniform": uniform_twin(cfg)}
    ready = {name: _compile(c, execution, batch, seq_len) for name, c in arms.items()}
    seconds = {name: 0.0 for name in arms}
    for _ in range(rounds):  # alternate so drift and noise hit both arms
        for name, arm in ready.items():
            dt, arm.state = _time(arm.compiled, arm.state, arm.tokens, steps)
            seconds[name] += dt
    out = {}
    for name, c in arms.items():
        arm = ready[name]
        tps = rounds * steps * batch * seq_len / seconds[name]
        flops = train_flops_per_token(c, seq_len)
        out[name] = {
            "params": param_counts(c).total,
            "tokens_per_s": tps,
            "step_s": seconds[name] / (rounds * steps),
            "mfu": mfu(flops, tps, arm.num_devices, execution.dtype),
            "compile_s": arm.compile_s,
            "peak_bytes": _peak_memory(arm.compiled),
            "q_heads": [x.q_heads for x in layer_layout(c)],
            "ffn_dims": [x.ffn_dim for x in layer_layout(c)],
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m elmjax.bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", help="OpenELM preset (default: a small CPU-sized layer-wise model)")
    p.add_argument("--config", help="take the model from this training config YAML instead")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-component timing of the layer-wise model")
    args = p.parse_args(argv)
    keep_scratch_in_heap()  # before JAX starts its CPU client; see elmjax.cpu_heap
    if args.config:
        try:
            cfg = config_io.load(Config, args.config, []).model
        except config_io.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        cfg = preset(args.preset) if args.preset else SMALL
    execution = ExecutionConfig(dtype=args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"),
                                remat=args.remat)
    res = bench(cfg, execution, args.batch, args.seq_len, args.steps, args.rounds)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  dtype {execution.dtype}  "
          f"batch {args.batch}  seq_len {args.seq_len}")
    arm = cfg
    twin = uniform_twin(cfg)
    print(f"layer-wise: {describe_arm(arm)}")
    print(f"   uniform: {describe_arm(twin)}  (elmjax.budget_match.uniform_twin, as sweeps match twins: "
          f"{param_counts(twin).total:,} vs {param_counts(arm).total:,} params, "
          f"{param_counts(twin).total / param_counts(arm).total - 1:+.2%})")
    for name, r in res.items():
        mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "n/a"
        print(f"{name:>10}: params {r['params']:,}  tokens/s {r['tokens_per_s']:,.0f}  MFU {mfu_s}  "
              f"compile {r['compile_s']:.1f} s  peak mem {mem}")
    ratio = res["layer-wise"]["tokens_per_s"] / res["uniform"]["tokens_per_s"]
    print(f"ratio layer-wise / uniform tokens/s: {ratio:.3f}  (target >= 0.95)")
    peak = peak_flops(dtype=execution.dtype)
    if peak is not None:
        source = "measured, cached" if jax.devices()[0].platform == "cpu" else "published"
        print(f"MFU against a peak of {peak / 1e9:,.0f} GFLOP/s per device ({source})")
    if not args.no_breakdown:
        # The optimizer training would use: muP's per-matrix multipliers included.
        optimizer = model_optimizer(cfg, OptimizerConfig(warmup_steps=2), 1000, nnx.to_pure_dict(abstract_model(cfg)[1]))
        times = component_times(cfg, optimizer, args.batch, args.seq_len, dtype=execution.dtype)
        print("layer-wise step by component:")
        print(format_breakdown(times, res["layer-wise"]["step_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
