"""Flat matmuls whose weight gradient XLA:CPU runs on its fast path.

The weight gradient of ``y = x @ w`` is ``x^T @ dy``, a dot contracting the
rows of both operands. XLA:CPU's YNNPACK fusions take only dots whose left
operand contracts its last axis, so that one falls back to a slower generic
dot. Here the backward transposes ``x`` explicitly (a barrier keeps XLA from
folding the transpose back into the dot) and both gradients are plain
row-major matmuls. On other backends ``matmul`` is ``x @ w``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x_ND: jax.Array, w_DF: jax.Array) -> jax.Array:
    """``x_ND @ w_DF`` for 2-D operands."""
    if jax.default_backend() != "cpu":
        return x_ND @ w_DF
    return _matmul(x_ND, w_DF)


@jax.custom_vjp
def _matmul(x_ND, w_DF):
    return x_ND @ w_DF


def _forward(x_ND, w_DF):
    return x_ND @ w_DF, (x_ND, w_DF)


def _backward(res, dy_NF):
    x_ND, w_DF = res
    dx_ND = jnp.matmul(dy_NF, w_DF.T)
    xT_DN = jax.lax.optimization_barrier(x_ND.T)
    dw_DF = jnp.matmul(xT_DN, dy_NF)
    return dx_ND, dw_DF


_matmul.defvjp(_forward, _backward)
