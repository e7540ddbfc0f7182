"""The model's random initial values drawn in one batch: the same bits, a far smaller init program.

``elmjax.model`` draws each random parameter as ``std * normal(key_i, shape)``
with ``key_i = fold_in(key, i)`` for the i-th draw of its ``nnx.Rngs``. Traced
as is, the init program holds a threefry key derivation, a threefry hash over
the parameter's shape and the normal transform for every parameter: on CPU,
XLA compiles each as kernels of their own (the quickstart's 250k layer-wise
model: 106 fusions) for a program that runs once per run. In a sweep
worker (one core), compiling the init programs of the quickstart's 6 models
took 13.1-14.0 s; batched, 7.6-8.2 s (three alternating runs each).

``batched_draws`` makes the same values with one kernel of each kind: all
keys by one vectorised ``fold_in``, all bits by one threefry over the
concatenated parameters (each element hashed with its parameter's key and its
flat index, which is what ``jax.random.bits`` hashes for any shape), one
uniform-to-normal transform, and per parameter only a slice and a scale.

Bits: ``jax.random.normal`` computes ``sqrt(2) * erf_inv(u)``, and XLA folds
the caller's ``std *`` into that constant, so each value is
``erf_inv(u) * float32(float32(sqrt(2)) * float32(std))``; this module
multiplies by exactly that. tests/test_init_draws.py checks the parameters
bit for bit against the per-parameter draws for several models. Used for
CPU-sized models only (``BATCH_LIMIT`` elements; the batch costs a few
temporaries of that size) with JAX's default (partitionable threefry) keys;
anything else draws per parameter as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from elmjax import model as model_lib

BATCH_LIMIT = 1 << 25  # parameters drawn in one batch at most (32M: ~0.5 GB of float32/uint32 temporaries)


@dataclass(frozen=True)
class Draw:
    shape: tuple[int, ...]
    std: float


def draw_plan(build) -> list[Draw]:
    """The random draws ``build()`` (a model constructor call) makes, in order; nothing is computed."""
    plan: list[Draw] = []

    def record(shape, std):
        plan.append(Draw(tuple(int(d) for d in shape), float(std)))
        return jnp.zeros(shape, jnp.float32)

    token = model_lib.PARAM_SOURCE.set(record)
    try:
        jax.eval_shape(build)
    finally:
        model_lib.PARAM_SOURCE.reset(token)
    return plan


def usable(plan: list[Draw], key) -> bool:
    """Whether ``batched_draws`` reproduces the per-parameter draws for this plan and key."""
    if not plan or sum(int(np.prod(d.shape)) for d in plan) > BATCH_LIMIT:
        return False
    return bool(jax.config.jax_threefry_partitionable) and str(jax.random.key_impl(key)) == "threefry2x32"


def batched_draws(key, plan: list[Draw]) -> list[jax.Array]:
    """``[std * normal(fold_in(key, i), shape) for i, (shape, std) in enumerate(plan)]``, bit for bit."""
    from jax._src.random.threefry2x32 import threefry2x32_p  # the primitive jax.random.bits hashes with

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(plan), dtype=jnp.uint32))
    words = jax.random.key_data(keys)  # [draws, 2] uint32
    sizes = [int(np.prod(d.shape)) for d in plan]
    k1 = jnp.concatenate([jnp.broadcast_to(words[i, 0], (n,)) for i, n in enumerate(sizes)])
    k2 = jnp.concatenate([jnp.broadcast_to(words[i, 1], (n,)) for i, n in enumerate(sizes)])
    # Each element's flat index in its own parameter, as a 64-bit count split in two words (all below 2**32 here).
    lo = jnp.concatenate([jax.lax.iota(jnp.uint32, n) for n in sizes])
    hi = jnp.zeros_like(lo)
    b1, b2 = threefry2x32_p.bind(k1, k2, hi, lo)
    bits = b1 ^ b2
    # jax.random.uniform(lo=nextafter(-1, 0), hi=1) from 23 mantissa bits, then erf_inv: jax.random.normal's steps.
    f32 = np.float32
    low, high = np.nextafter(f32(-1.0), f32(0.0), dtype=f32), f32(1.0)
    mantissa = jax.lax.shift_right_logical(bits, jnp.array(32 - 23, jnp.uint32))
    one_bits = jnp.asarray(np.array(1.0, f32).view(np.uint32), dtype=jnp.uint32)
    floats = jax.lax.bitcast_convert_type(jax.lax.bitwise_or(mantissa, one_bits), jnp.float32) - jnp.array(1.0, f32)
    u = jax.lax.max(low, floats * (high - low) + low)
    e = jax.lax.erf_inv(u)
    out, start = [], 0
    for d, n in zip(plan, sizes):
        scale = f32(f32(np.sqrt(2)) * f32(d.std))
        out.append(e[start:start + n].reshape(d.shape) * scale)
        start += n
    return out


@contextlib.contextmanager
def drawn_in_batch(build, key):
    """Within the block, ``build()`` (called once) takes its random values from one batched draw."""
    plan = draw_plan(build)
    if not usable(plan, key):
        yield
        return
    values = iter(zip(plan, batched_draws(key, plan)))

    def take(shape, std):
        d, value = next(values, (None, None))
        if d is None:
            raise RuntimeError("the model drew more random parameters than its plan")
        if d.shape != tuple(shape) or d.std != float(std):
            raise RuntimeError(f"init draw {d} does not match the model's ({tuple(shape)}, {std})")
        return value

    token = model_lib.PARAM_SOURCE.set(take)
    try:
        yield
    finally:
        model_lib.PARAM_SOURCE.reset(token)
    if next(values, None) is not None:
        raise RuntimeError("the model drew fewer random parameters than its plan")
