"""Where a train step's time goes: its parts timed in isolation.

Each component (embedding, attention, FFN, head and loss, optimizer update)
is jitted on its own at the bench's shapes and timed forward, and forward
plus backward (gradients with respect to its parameters and its input).
Attention and FFN are summed over all layers; attention includes its
RMSNorm, QK-norm and RoPE, the FFN its RMSNorm. The parts do not sum exactly
to the step: inside one program XLA fuses across their borders, schedules
them together and allocates memory once, and the step also computes the
gradient norm. Use it to locate a regression, not as an account.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from elmjax.model import OpenELM, default_rotary
from elmjax.model_config import ModelConfig
from elmjax.train_step import cross_entropy

COMPONENTS = ("embedding", "attention", "ffn", "head+loss", "optimizer")


def _best(fn: Callable, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _fwd_bwd(module: nnx.Module, apply: Callable, *inputs, reps: int) -> tuple[float, float]:
    """Seconds for apply(module, *inputs), and for its gradient w.r.t. the
    module's parameters and the first input when that is a float array."""
    graphdef, params = nnx.split(module, nnx.Param)

    def run(p, *a):
        return apply(nnx.merge(graphdef, p), *a)

    def scalar(p, *a):
        return jnp.sum(run(p, *a).astype(jnp.float32))

    wrt = (0, 1) if jnp.issubdtype(inputs[0].dtype, jnp.floating) else 0
    return _best(jax.jit(run), params, *inputs, reps=reps), _best(jax.jit(jax.grad(scalar, argnums=wrt)), params, *inputs, reps=reps)


def component_times(cfg: ModelConfig, optimizer: optax.GradientTransformation, batch: int, seq_len: int,
                    *, dtype: str = "float32", reps: int = 5) -> dict[str, tuple[float, float | None]]:
    """{component: (forward seconds, forward+backward seconds or None)}."""
    model = OpenELM(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32))
    x = jnp.asarray(rng.standard_normal((batch, seq_len, cfg.model_dim), np.float32), model.dtype)
    rot = default_rotary(seq_len, cfg.head_dim, cfg.rope_theta)  # as training computes it
    out = {"embedding": _fwd_bwd(model, lambda m, t: m.embed(t), tokens[:, :-1], reps=reps)}
    for name, apply in (("attention", lambda layer, h: layer.attn(layer.attn_norm(h), rot)),
                        ("ffn", lambda layer, h: layer.ffn(layer.ffn_norm(h)))):
        per_layer = [_fwd_bwd(layer, apply, x, reps=reps) for layer in model.layers]
        out[name] = (sum(f for f, _ in per_layer), sum(b for _, b in per_layer))
    out["head+loss"] = _fwd_bwd(model, lambda m, h, t: cross_entropy(m.logits(h), t)[0], x, tokens[:, 1:], reps=reps)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, optimizer.update(g, s, p)[0]))
    out["optimizer"] = (_best(update, params, optimizer.init(params), params, reps=reps), None)
    return out


def format_breakdown(times: dict[str, tuple[float, float | None]], step_s: float) -> str:
    lines = [f"{'component':>10}  {'fwd ms':>8}  {'fwd+bwd ms':>10}  share of step"]
    for name in COMPONENTS:
        fwd, both = times[name]
        total = both if both is not None else fwd
        both_s = f"{1e3 * both:10.2f}" if both is not None else f"{'-':>10}"
        lines.append(f"{name:>10}  {1e3 * fwd:8.2f}  {both_s}  {100 * total / step_s:5.1f}%")
    parts = sum(b if b is not None else f for f, b in times.values())
    lines.append(f"{'sum':>10}  {'':8}  {1e3 * parts:10.2f}  {100 * parts / step_s:5.1f}%  "
                 f"(of a {1e3 * step_s:.1f} ms step; parts timed alone, see elmjax.breakdown)")
    return "\n".join(lines)
