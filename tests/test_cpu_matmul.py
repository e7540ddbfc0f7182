import re

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.cpu_matmul import matmul


def _grads(f, x, w):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1)))(x, w)


def test_gradients_equal_autodiffs():
    x = jax.random.normal(jax.random.key(0), (64, 24))
    w = jax.random.normal(jax.random.key(1), (24, 40))
    np.testing.assert_array_equal(np.asarray(matmul(x, w)), np.asarray(x @ w))
    for got, want in zip(_grads(matmul, x, w), _grads(lambda a, b: a @ b, x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_weight_with_more_axes_keeps_them():
    x = jax.random.normal(jax.random.key(0), (64, 24))
    w = jax.random.normal(jax.random.key(1), (24, 2, 3, 5))
    assert matmul(x, w).shape == (64, 2, 3, 5)
    np.testing.assert_allclose(matmul(x, w), jnp.einsum("nd,dkce->nkce", x, w), rtol=1e-5, atol=1e-5)
    f = lambda a, b: jnp.einsum("nd,dkce->nkce", a, b)
    for got, want in zip(_grads(matmul, x, w), _grads(f, x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _transposed_lhs_dots(f, x, w) -> int:
    """Dots in the compiled gradient whose left operand contracts its first axis."""
    text = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1))).lower(x, w).compile().as_text()
    return len(re.findall(r"lhs_contracting_dims=\{0\}", text))


def test_weight_gradient_is_a_plain_matmul_on_cpu():
    # XLA:CPU's fast (YNNPACK) dots need the left operand to contract its
    # last axis; autodiff's weight gradient x^T dy contracts the first, and
    # ran on the slow generic dot (about 5% of the tiny model's train step).
    x = jax.random.normal(jax.random.key(0), (2048, 128))
    w = jax.random.normal(jax.random.key(1), (128, 512))
    assert _transposed_lhs_dots(lambda a, b: a @ b, x, w) > 0  # the check sees the slow form
    assert _transposed_lhs_dots(matmul, x, w) == 0
