"""Generation throughput: KV-cached decoding vs recomputing the prefix per token.

Random weights, float32 by default. For each model and batch size, both
methods generate the same number of greedy tokens from the same prompts in
this process; printed are new tokens per second (prompt processing
included, compilation excluded) and the ratio cached / recompute::

    python -m elmjax.bench_generate --quick          # a few minutes on a laptop CPU
    python -m elmjax.bench_generate --models small --batches 1 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.generate import _forward, bucket_length, generate, generate_recompute
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig, preset

MODELS = {
    "small": lambda: ModelConfig(num_layers=4, model_dim=256, head_dim=32, vocab_size=259),
    "OpenELM-270M": lambda: preset("OpenELM-270M"),
}


def random_model(cfg: ModelConfig, seed: int = 0, dtype: str = "float32") -> OpenELM:
    """An OpenELM with numpy-drawn weights at the model's own init scales.

    Same distribution as ``OpenELM(cfg, rngs=...)`` but without JAX's RNG:
    compiling threefry for every parameter shape costs seconds on CPU, which
    dominates small benchmarks and tests."""
    abstract = nnx.eval_shape(lambda: OpenELM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    std = cfg.model_dim**-0.5

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if len(leaf.shape) == 1:  # RMSNorm weights
            return jnp.ones(leaf.shape, jnp.float32)
        scale = std * (2 * cfg.num_layers) ** -0.5 if name.startswith("out_") else std
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) * scale)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_one(model, batch: int, prompt_len: int, new_tokens: int, reps: int, seed: int = 0) -> dict:
    """Tokens/s of both methods on the same random prompts; outputs are checked equal."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, model.cfg.vocab_size, (batch, prompt_len)).tolist()
    cached = generate(model, prompts, new_tokens)  # compiles
    graphdef, state = nnx.split(model)
    for width in sorted({bucket_length(prompt_len + s) for s in range(new_tokens)}):
        _forward(graphdef, state, jnp.zeros((batch, width), jnp.int32)).block_until_ready()  # compiles
    t_cache = _best_time(lambda: generate(model, prompts, new_tokens), reps)
    recomputed = []
    t_full = _best_time(lambda: recomputed.append(generate_recompute(model, prompts, new_tokens)), 1)
    # Same greedy tokens (bf16/f32 rounding can flip a near-tie, so report rather than assert).
    agree = float(np.mean(np.array(cached) == np.array(recomputed[-1])))
    n = batch * new_tokens
    return {"cached_tok_s": n / t_cache, "recompute_tok_s": n / t_full, "ratio": t_full / t_cache, "agree": agree}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m elmjax.bench_generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short prompts/generations, one timing rep")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    prompt_len = args.prompt_len or (32 if args.quick else 128)
    reps = 1 if args.quick else 3
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  dtype: {args.dtype}  prompt: {prompt_len} tokens")
    print(f"{'model':<14} {'batch':>5} {'new':>4} {'cached tok/s':>13} {'recompute tok/s':>16} {'ratio':>7} {'agree':>6}")
    for name in args.models:
        model = random_model(MODELS[name](), dtype=args.dtype)
        # The recompute baseline is quadratic; keep the big model's run short.
        new = args.new_tokens or (32 if args.quick else 64) // (2 if name != "small" else 1)
        for batch in args.batches:
            r = bench_one(model, batch, prompt_len, new, reps)
            print(f"{name:<14} {batch:>5} {new:>4} {r['cached_tok_s']:>13.1f} {r['recompute_tok_s']:>16.1f} "
                  f"{r['ratio']:>6.1f}x {r['agree']:>6.2f}", flush=True)
        del model


if __name__ == "__main__":
    main()
