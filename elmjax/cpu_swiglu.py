"""SwiGLU's gate on the fused projection: ``silu(u[:, 0]) * u[:, 1]``.

``u`` [N, 2, F] is the output of the fused input projection (gate first,
OpenELM's chunk(2) order). Autodiff of the expression leaves XLA:CPU
separate passes over the [N, F] activations for the sigmoid, ``silu``, the
product and each gradient, and zero-pads each half's gradient back to the
fused width. Here the forward is one pass and the backward recomputes the
sigmoid and writes the fused gradient at once:

    s = sigmoid(a),  da = dh * b * s * (1 + a * (1 - s)),  db = dh * a * s.

On other backends ``swiglu`` is the plain expression.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _plain(u_N2F: jax.Array) -> jax.Array:
    return jax.nn.silu(u_N2F[:, 0]) * u_N2F[:, 1]


def swiglu(u_N2F: jax.Array) -> jax.Array:
    """``silu(gate) * linear`` of the fused [N, 2, F] projection -> [N, F]."""
    if jax.default_backend() != "cpu":
        return _plain(u_N2F)
    return _swiglu(u_N2F)


@jax.custom_vjp
def _swiglu(u_N2F):
    return _plain(u_N2F)


def _forward(u_N2F):
    return _plain(u_N2F), u_N2F


def _backward(u_N2F, dh_NF):
    a, b = u_N2F[:, 0], u_N2F[:, 1]
    s = jax.nn.sigmoid(a)
    one = jnp.asarray(1, a.dtype)
    return (jnp.stack([dh_NF * b * s * (one + a * (one - s)), dh_NF * a * s], axis=1),)


_swiglu.defvjp(_forward, _backward)
