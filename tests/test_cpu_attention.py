"""The CPU attention kernel computes what jax.nn.dot_product_attention does,
forward and backward (it has a hand-written VJP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmjax.cpu_attention import causal_attention


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 1), (2, 2)])
def test_forward_and_gradients_match_xla_attention(heads, kv_heads):
    assert jax.default_backend() == "cpu"  # the hand-written kernel is the CPU path
    B, L, E = 2, 7, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, L, heads, E))
    k = jax.random.normal(keys[1], (B, L, kv_heads, E))
    v = jax.random.normal(keys[2], (B, L, kv_heads, E))
    cot = jax.random.normal(keys[3], (B, L, heads, E))  # a non-uniform cotangent

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=E**-0.5)

    def ours(q, k, v):
        return causal_attention(q, k, v, E**-0.5)

    out, vjp = jax.vjp(ours, q, k, v)
    want, want_vjp = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for got_g, want_g in zip(vjp(cot), want_vjp(cot)):
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5)
    # Causality: the first position's output depends on the first key/value only.
    np.testing.assert_allclose(out[:, 0], jnp.repeat(v[:, 0], heads // kv_heads, axis=1), rtol=1e-5, atol=1e-6)


def test_backward_transposes_no_score_sized_tensor():
    # dK and dV contract over the query rows; transposing the [M, S] softmax
    # and its gradient to feed them cost ~5% of the tiny model's CPU step.
    # The narrow [M, E] operands are transposed instead.
    B, L, H, K, E = 2, 16, 4, 2, 8  # M = G * L = 32 query rows per group, S = 16 keys
    q = jnp.ones((B, L, H, E))
    kv = jnp.ones((B, L, K, E))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v, 0.3) ** 2), argnums=(0, 1, 2)))
    text = grad.lower(q, kv, kv).compile().as_text()
    transposes = [line for line in text.splitlines() if " transpose(" in line]
    assert transposes  # the check sees the transposes there are
    assert not [t for t in transposes if "f32[2,2,16,32]" in t or "f32[2,2,32,16]" in t], transposes
