"""``x @ w`` for flat rows ``x`` [N, D] and a weight ``w`` [D, ...] whose
weight gradient XLA:CPU runs on its fast path.

The weight gradient is ``x^T @ dy``, a dot contracting the rows of both
operands. XLA:CPU's YNNPACK fusions take only dots whose left operand
contracts its last axis, so that one fell back to a slower generic dot.
Here the backward transposes ``x`` explicitly (a barrier keeps XLA from
folding the transpose back into the dot), and both gradients are plain
row-major matmuls. On other backends ``matmul`` is the same contraction
left to autodiff. The weight keeps its axes (no reshape): a weight split
over devices on a minor axis stays split the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x_ND: jax.Array, w_D: jax.Array) -> jax.Array:
    """[N, D] x [D, ...] -> [N, ...]."""
    if jax.default_backend() != "cpu":
        return jnp.tensordot(x_ND, w_D, axes=1)
    return _matmul(x_ND, w_D)


@jax.custom_vjp
def _matmul(x_ND, w_D):
    return jnp.tensordot(x_ND, w_D, axes=1)


def _forward(x_ND, w_D):
    return jnp.tensordot(x_ND, w_D, axes=1), (x_ND, w_D)


def _backward(res, dy_N):
    x_ND, w_D = res
    rest = tuple(range(1, w_D.ndim))
    dx_ND = jnp.tensordot(dy_N, w_D, axes=(rest, rest))
    xT_DN = jax.lax.optimization_barrier(x_ND.T)
    dw_D = jnp.tensordot(xT_DN, dy_N, axes=1)
    return dx_ND, dw_D


_matmul.defvjp(_forward, _backward)
