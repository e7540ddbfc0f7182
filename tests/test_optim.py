import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elmjax.config import OptimizerConfig
from elmjax.optim import decay_mask, lr_schedule, make_optimizer


def test_warmup_then_cosine_to_ten_percent():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    sched = lr_schedule(cfg, 100)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)  # cosine midpoint
    assert float(sched(100)) == pytest.approx(1e-4)
    values = [float(sched(s)) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_skips_norm_weights():
    params = {"w": jnp.ones((4, 4)), "emb": jnp.ones((8, 4)), "norm": {"weight": jnp.ones(4)}}
    assert decay_mask(params) == {"w": True, "emb": True, "norm": {"weight": False}}
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, min_lr_ratio=1.0)
    opt = make_optimizer(cfg, 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["w"][0, 0]) == pytest.approx(1 - 0.1 * 0.5)
    assert float(new["emb"][0, 0]) == pytest.approx(1 - 0.1 * 0.5)
    np.testing.assert_array_equal(new["norm"]["weight"], 1.0)


def test_global_norm_clipping():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=1.0, min_lr_ratio=1.0)
    params = {"w": jnp.zeros(4)}
    clipped = make_optimizer(cfg, 10)
    unclipped = make_optimizer(cfg.__class__(**{**cfg.__dict__, "clip_norm": 0.0}), 10)
    g = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}
    # Adam normalises the first step anyway; inspect the clipping stage alone.
    clip_state = clipped.init(params)
    first = optax.clip_by_global_norm(1.0).update(g, clip_state[0])[0]
    assert float(optax.tree.norm(first)) == pytest.approx(1.0)
    assert len(clipped.init(params)) == 2 and len(unclipped.init(params)) == 1


def test_lr_multipliers_scale_each_leafs_update_and_its_weight_decay():
    params = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}
    mult = {"w": 0.25, "v": 1.0}
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, min_lr_ratio=1.0, clip_norm=0.0)
    opt = make_optimizer(cfg, 10, lr_multipliers=mult)
    # Zero gradients: the update is the decoupled decay alone.
    zero = jax.tree.map(jnp.zeros_like, params)
    new = optax.apply_updates(params, opt.update(zero, opt.init(params), params)[0])
    assert float(new["w"][0, 0]) == pytest.approx(1 - 0.25 * 0.1 * 0.5)
    assert float(new["v"][0, 0]) == pytest.approx(1 - 0.1 * 0.5)
    # A gradient: Adam's first step is lr * sign(g), times the multiplier.
    no_decay = make_optimizer(cfg.__class__(**{**cfg.__dict__, "weight_decay": 0.0}), 10, lr_multipliers=mult)
    g = jax.tree.map(jnp.ones_like, params)
    updates = no_decay.update(g, no_decay.init(params), params)[0]
    np.testing.assert_allclose(updates["w"], -0.025, rtol=1e-5)
    np.testing.assert_allclose(updates["v"], -0.1, rtol=1e-5)
    # Without multipliers the chain is the one before muP: clipping state and AdamW's.
    assert len(make_optimizer(OptimizerConfig(), 10).init(params)) == 2
