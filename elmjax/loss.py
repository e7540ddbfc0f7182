"""Next-token cross-entropy, whole or a sequence chunk at a time.

The whole version takes float32 logits [B, L, V]. At a 32k vocabulary those
logits (and their gradient) are the largest arrays of a small model's step,
so ``chunked_cross_entropy`` takes the last hidden states instead and runs
final norm -> output head -> log-sum-exp over ``chunk`` positions at a time
in a ``lax.scan``, with ``jax.checkpoint`` per chunk so the backward pass
recomputes each chunk's logits rather than keeping them: at most [B, chunk, V]
float32 logits exist at once. Same loss and gradients up to summation order.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array | None = None):
    """Mean float32 next-token cross-entropy and the mean log-partition squared."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_BL = log_z_BL - target_logit_BL
    if weights_BL is None:
        return jnp.mean(nll_BL), jnp.mean(log_z_BL**2)
    denom = jnp.maximum(jnp.sum(weights_BL), 1.0)
    return jnp.sum(nll_BL * weights_BL) / denom, jnp.sum(log_z_BL**2 * weights_BL) / denom


def chunk_length(seq_len: int, chunk: int) -> int:
    """The largest divisor of ``seq_len`` that is at most ``chunk`` (scan needs equal chunks)."""
    chunk = max(1, min(chunk, seq_len))
    while seq_len % chunk:
        chunk -= 1
    return chunk


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], x_BLD: jax.Array, targets_BL: jax.Array,
                          chunk: int):
    """``cross_entropy(logits_fn(x_BLD), targets_BL)`` without all [B, L, V] logits at once.

    ``logits_fn`` maps hidden states [B, C, D] to float32 logits [B, C, V]
    (``OpenELM.logits``: final norm and output head)."""
    B, L, D = x_BLD.shape
    C = chunk_length(L, chunk)
    x_NBCD = x_BLD.reshape(B, L // C, C, D).swapaxes(0, 1)
    t_NBC = targets_BL.reshape(B, L // C, C).swapaxes(0, 1)

    @jax.checkpoint
    def sums(x_BCD, t_BC):
        logits_BCV = logits_fn(x_BCD).astype(jnp.float32)
        log_z_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        return jnp.sum(log_z_BC - target_BC), jnp.sum(log_z_BC**2)

    def body(carry, xs):
        nll, z2 = sums(*xs)
        return (carry[0] + nll, carry[1] + z2), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z2), _ = jax.lax.scan(body, (zero, zero), (x_NBCD, t_NBC))
    return nll / (B * L), z2 / (B * L)
