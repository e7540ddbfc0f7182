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
HOST_CHUNK = 1 << 20  # elements per call of host_draws' program


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
    words = _draw_key_words(key, jnp.arange(len(plan), dtype=jnp.uint32))  # [draws, 2] uint32
    sizes = [int(np.prod(d.shape)) for d in plan]
    k1 = jnp.concatenate([jnp.broadcast_to(words[i, 0], (n,)) for i, n in enumerate(sizes)])
    k2 = jnp.concatenate([jnp.broadcast_to(words[i, 1], (n,)) for i, n in enumerate(sizes)])
    # Each element's flat index in its own parameter, as a 64-bit count split in two words (all below 2**32 here).
    lo = jnp.concatenate([jax.lax.iota(jnp.uint32, n) for n in sizes])
    e = _erf_inv_normals(k1, k2, lo)
    out, start = [], 0
    for d, n in zip(plan, sizes):
        out.append(e[start:start + n].reshape(d.shape) * _scale(d))
        start += n
    return out


def host_draws(key, plan: list[Draw]) -> list[np.ndarray]:
    """``batched_draws`` with the same bits, assembled on the host: the only programs are the key derivation
    and a hash-and-transform over ``HOST_CHUNK`` elements, neither shaped by the model, so any model of any
    size reuses them (and the persistent cache keeps them across processes). The per-parameter slices and
    scales are numpy's float32 products, the same IEEE roundings as XLA's."""
    sizes = np.array([int(np.prod(d.shape)) for d in plan], np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    total = int(ends[-1])
    # Key words of every draw; the index padded to a multiple of 64 so models share the program.
    index = np.arange(-(-len(plan) // 64) * 64, dtype=np.uint32)
    words = np.asarray(_draw_key_words(key, index))[: len(plan)]
    e = np.empty(total, np.float32)
    for a in range(0, total, HOST_CHUNK):
        flat = np.arange(a, a + HOST_CHUNK, dtype=np.int64)
        draw = np.minimum(np.searchsorted(ends, flat, side="right"), len(plan) - 1)  # the tail past total: any
        lo = (flat - starts[draw]).astype(np.uint32)
        chunk = _erf_inv_chunk(words[draw, 0], words[draw, 1], lo)
        e[a : a + HOST_CHUNK] = np.asarray(chunk)[: min(HOST_CHUNK, total - a)]
    return [e[s : s + n].reshape(d.shape) * _scale(d) for d, s, n in zip(plan, starts, sizes)]


def _scale(d: Draw) -> np.float32:
    """``normal``'s sqrt(2) times the caller's std, folded as XLA folds them (see the module docstring)."""
    f32 = np.float32
    return f32(f32(np.sqrt(2)) * f32(d.std))


def _erf_inv_normals(k1, k2, lo):
    """``erf_inv(u)`` for uniform ``u`` from each element's threefry bits: ``jax.random.normal`` before its
    sqrt(2) (``_scale``). Keys (k1, k2) and the flat index ``lo`` per element, all uint32."""
    from jax._src.random.threefry2x32 import threefry2x32_p  # the primitive jax.random.bits hashes with

    b1, b2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(lo), lo)  # the index's high word: 0 (below 2**32)
    bits = b1 ^ b2
    # jax.random.uniform(lo=nextafter(-1, 0), hi=1) from 23 mantissa bits, then erf_inv: jax.random.normal's steps.
    f32 = np.float32
    low, high = np.nextafter(f32(-1.0), f32(0.0), dtype=f32), f32(1.0)
    mantissa = jax.lax.shift_right_logical(bits, jnp.array(32 - 23, jnp.uint32))
    one_bits = jnp.asarray(np.array(1.0, f32).view(np.uint32), dtype=jnp.uint32)
    floats = jax.lax.bitcast_convert_type(jax.lax.bitwise_or(mantissa, one_bits), jnp.float32) - jnp.array(1.0, f32)
    u = jax.lax.max(low, floats * (high - low) + low)
    return jax.lax.erf_inv(u)


_erf_inv_chunk = jax.jit(_erf_inv_normals)


@jax.jit
def _draw_key_words(key, index):
    """[n] uint32 -> [n, 2] uint32: the key data of ``fold_in(key, i)`` for each i."""
    return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(index))


@contextlib.contextmanager
def drawn_in_batch(build, key):
    """Within the block, ``build()`` (called once) takes its random values from one batched draw."""
    plan = draw_plan(build)
    if not usable(plan, key):
        yield
        return
    with drawing(plan, batched_draws(key, plan)):
        yield


@contextlib.contextmanager
def drawing(plan: list[Draw], values: list) -> None:
    """Within the block, the model's random parameters are ``values`` (drawn for ``plan``), in order; a model
    drawing other shapes or scales than planned, or more or fewer of them, is an error."""
    pairs = iter(zip(plan, values))

    def take(shape, std):
        d, value = next(pairs, (None, None))
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
    if next(pairs, None) is not None:
        raise RuntimeError("the model drew fewer random parameters than its plan")
