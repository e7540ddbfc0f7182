import jax
import jax.numpy as jnp
import numpy as np

from elmjax.cpu_swiglu import swiglu


def plain(u):
    return jax.nn.silu(u[:, 0]) * u[:, 1]


def test_forward_is_silu_of_the_gate_times_the_linear_half_to_the_bit():
    u = jax.random.normal(jax.random.key(0), (256, 2, 96)) * 4
    np.testing.assert_array_equal(np.asarray(jax.jit(swiglu)(u)), np.asarray(jax.jit(plain)(u)))


def test_gradient_equals_autodiffs_of_the_plain_expression():
    u = jax.random.normal(jax.random.key(0), (256, 2, 96)) * 4  # both tails of the sigmoid
    dh = jax.random.normal(jax.random.key(1), (256, 96))

    def grad(f):
        return jax.jit(jax.grad(lambda u: jnp.sum(f(u) * dh)))(u)

    got, want = grad(swiglu), grad(plain)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Gate first: the gradient of the swapped expression differs, so the check can fail.
    swapped = grad(lambda u: jax.nn.silu(u[:, 1]) * u[:, 0])
    assert not np.allclose(got, swapped, atol=1e-3)
