import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.loss import chunk_length, chunked_cross_entropy, cross_entropy
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig

CFG = ModelConfig(num_layers=1, model_dim=32, head_dim=8, num_gqa_groups=2, ffn_dim_divisor=16, vocab_size=300)


def test_chunk_length_divides_the_sequence():
    assert chunk_length(32, 8) == 8
    assert chunk_length(30, 8) == 6
    assert chunk_length(7, 100) == 7
    assert chunk_length(13, 4) == 1


def test_chunked_loss_and_gradients_equal_the_whole_loss():
    chunk = 5  # does not divide the 24 positions: chunks of 4
    graphdef, params = nnx.split(OpenELM(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (3, 25), 0, CFG.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def whole(p):
        ce, z2 = cross_entropy(nnx.merge(graphdef, p)(inputs), targets)
        return ce + 1e-2 * z2

    def chunked(p):
        model = nnx.merge(graphdef, p)
        ce, z2 = chunked_cross_entropy(model.logits, model.hidden(inputs), targets, chunk)
        return ce + 1e-2 * z2

    (a, ga), (b, gb) = jax.jit(jax.value_and_grad(whole))(params), jax.jit(jax.value_and_grad(chunked))(params)
    assert float(b) == pytest.approx(float(a), rel=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(x))))
    # A wrong target offset must show: the comparison is not vacuous.
    model = nnx.merge(graphdef, params)
    shifted, _ = chunked_cross_entropy(model.logits, model.hidden(inputs), jnp.roll(targets, 1, axis=1), chunk)
    assert abs(float(shifted) - float(a)) > 1e-3


def test_chunked_loss_never_holds_all_logits():
    """The compiled chunked step's temporaries are far below one [B, L, V] float32 array."""
    cfg = CFG.replace(vocab_size=8192)
    graphdef, params = nnx.split(OpenELM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jnp.zeros((4, 257), jnp.int32)

    def loss(p, chunk):
        model = nnx.merge(graphdef, p)
        if chunk:
            return chunked_cross_entropy(model.logits, model.hidden(tokens[:, :-1]), tokens[:, 1:], chunk)[0]
        return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])[0]

    def temp(chunk):
        fn = jax.jit(jax.grad(loss), static_argnums=1)
        return fn.lower(params, chunk).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 4 * 256 * 8192 * 4
    assert temp(0) >= logits_bytes  # the whole loss does hold them
    assert temp(32) < logits_bytes / 2
