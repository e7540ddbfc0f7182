"""Attention implementations against the XLA path. cuDNN needs a GPU and is
only dispatch-tested here; splash runs in Pallas interpret mode on CPU."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.attention import attend, resolve
from elmjax.layout import layer_layout
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig


def _qkv(B=2, L=128, K=2, G=3, E=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, L, K * G, E)), jax.random.normal(keys[1], (B, L, K, E)),
            jax.random.normal(keys[2], (B, L, K, E)))


def test_auto_picks_the_kernel_for_the_backend_and_dtype(caplog):
    assert resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert resolve("auto", jnp.float32, "tpu") == "splash"
    with caplog.at_level(logging.WARNING, logger="elmjax.attention"):
        assert resolve("auto", jnp.float32, "gpu") == "xla"
        assert resolve("auto", jnp.float32, "gpu") == "xla"
    notices = [r for r in caplog.records if "using XLA attention" in r.message]
    assert len(notices) == 1  # once, not per layer or per call
    assert resolve("xla", jnp.float32, "tpu") == "xla"
    with pytest.raises(ValueError, match="cudnn needs an NVIDIA GPU"):
        resolve("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(ValueError, match="not one of"):
        resolve("flash", jnp.float32, "cpu")


def test_splash_equals_xla_for_gqa_forward_and_backward():
    q, k, v = _qkv()
    scale = 16**-0.5

    def loss(impl, q, k, v):
        out = attend(q, k, v, causal=True, scale=scale, impl=impl)
        return jnp.sum(out * jnp.cos(out)), out

    (_, ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)("xla", q, k, v)
    (_, got), g_got = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)("splash", q, k, v)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # Serving query head h by kv head h % K instead of h // G gives other
    # outputs on this data, so a grouping bug in the kernel path would show.
    H, K = q.shape[2], k.shape[2]
    idx = [h for j in range(K) for h in range(H) if h % K == j]
    wrong = jnp.zeros_like(ref).at[:, :, jnp.array(idx)].set(attend(q[:, :, jnp.array(idx)], k, v, causal=True, scale=scale))
    assert not np.allclose(wrong, ref, atol=1e-3)


def test_model_with_splash_matches_xla_across_layer_wise_head_counts():
    cfg = ModelConfig(num_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2, qkv_multipliers=(0.5, 1.5),
                      ffn_multipliers=1.0, ffn_dim_divisor=16, vocab_size=97)
    assert len({lay.kv_heads for lay in layer_layout(cfg)}) > 1
    tokens = jax.random.randint(jax.random.key(3), (2, 128), 0, cfg.vocab_size)
    xla = OpenELM(cfg, rngs=nnx.Rngs(0))
    splash = OpenELM(cfg, rngs=nnx.Rngs(0), attention="splash")
    apply = nnx.jit(lambda m, t: m(t))
    np.testing.assert_allclose(apply(splash, tokens), apply(xla, tokens), atol=1e-4)


def test_unservable_calls_fall_back_to_xla(caplog):
    q, k, v = _qkv(L=8)
    with caplog.at_level(logging.WARNING, logger="elmjax.attention"):
        got = attend(q, k, v, causal=True, scale=0.25, impl="splash")
    np.testing.assert_allclose(got, attend(q, k, v, causal=True, scale=0.25, impl="xla"), atol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        OpenELM(ModelConfig(), rngs=nnx.Rngs(0), attention="flash")


def test_splash_runs_per_shard_on_a_mesh():
    from elmjax.config import MeshConfig
    from elmjax.hlo_stats import parse_collectives, summarize
    from elmjax.sharding import activation_sharding, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    q, k, v = _qkv(B=4, K=2, G=2)

    def f(q, k, v, impl):
        with activation_sharding(mesh):
            return attend(q, k, v, causal=True, scale=0.25, impl=impl)

    sharded = jax.jit(f, static_argnums=3)
    np.testing.assert_allclose(sharded(q, k, v, "splash"), sharded(q, k, v, "xla"), atol=2e-5)
    # Batch over (data, fsdp), kv groups over tensor: the kernel needs no
    # communication at all (a Pallas call left to GSPMD would be gathered).
    in_sh = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
    hlo = jax.jit(f, static_argnums=3, in_shardings=(in_sh,) * 3).lower(q, k, v, "splash").compile().as_text()
    table = summarize(parse_collectives(hlo))
    assert all(row["count"] == 0 for row in table.values()), table


def test_decoding_with_a_kernel_requested_falls_back_to_xla():
    from elmjax.generate import generate

    cfg = ModelConfig(num_layers=2, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, vocab_size=97)
    prompt = [5, 9, 11]
    want = generate(OpenELM(cfg, rngs=nnx.Rngs(0)), prompt, 4)
    assert generate(OpenELM(cfg, rngs=nnx.Rngs(0), attention="splash"), prompt, 4) == want
