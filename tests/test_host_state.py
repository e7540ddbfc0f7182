"""elmjax.host_state: the train state put together on the host has every bit and sharding of the init program's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compile_log import backend_compiles
from elmjax import init_draws, programs
from elmjax.host_state import host_creator, zero_shapes
from elmjax.sharding import make_mesh
from elmjax.state import state_layout
from train_helpers import tiny_config

LAYERWISE = ("model.num_layers=4", "model.model_dim=77", "model.qkv_multipliers=[0.5,1.0]",
             "model.ffn_multipliers=[0.5,4.0]", "model.vocab_size=259")
MODELS = {
    "layer-wise": LAYERWISE,
    "uniform": (*LAYERWISE, "model.qkv_multipliers=[1.0,1.0]", "model.ffn_multipliers=[2.0,2.0]"),
    "untied-middle-noclip": (*LAYERWISE, "model.tie_embeddings=false", "model.qkv_schedule=middle",
                             "model.num_layers=3", "optimizer.clip_norm=0"),
    "mup": (*LAYERWISE, "model.parametrization=mup"),
    "fsdp-8-devices": (*LAYERWISE, "mesh.data=1", "mesh.fsdp=8", "model.model_dim=80"),
}


def layout_of(tmp_path, overrides):
    cfg = tiny_config(tmp_path / "run", *overrides)
    mesh = make_mesh(cfg.mesh)
    return cfg, mesh, state_layout(cfg, mesh)


def leaves(state):
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_host_built_state_has_every_bit_and_sharding_of_the_init_program(tmp_path, name):
    cfg, mesh, layout = layout_of(tmp_path, MODELS[name])
    compiled = programs._compile_create(mesh, layout)
    with backend_compiles() as compiles:
        create = host_creator(cfg.model, layout)
        assert create is not None
        states = {seed: create(np.int32(seed)) for seed in (0, 7, 2**31 - 1)}
    # The variant under test compiles no init program (only its model-independent draw programs, if any).
    assert not any("create" in c or "init_params" in c for c in compiles), compiles
    for seed, got in states.items():
        want = compiled(np.int32(seed))
        assert [p for p, _ in leaves(got)] == [p for p, _ in leaves(want)]
        for (path, a), (_, b) in zip(leaves(got), leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape, path
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), f"{name} {path}: placed differently"
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{name}, seed {seed}, {path}: values differ"
    if name == "fsdp-8-devices":  # the sharded case really is sharded
        assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated for _, a in leaves(got))


def test_draws_that_span_several_chunks_keep_their_bits(monkeypatch):
    """host_draws hashes HOST_CHUNK elements per call: parameters cut by chunk boundaries, and a last chunk
    past the end, must still get the batched draw's bits."""
    from flax import nnx

    from elmjax.model import OpenELM
    from elmjax.model_config import ModelConfig

    cfg = ModelConfig(num_layers=2, model_dim=40, head_dim=8, num_gqa_groups=2, vocab_size=97,
                      qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0), ffn_dim_divisor=8)
    key = jax.random.key(11)
    plan = init_draws.draw_plan(lambda: OpenELM(cfg, rngs=nnx.Rngs(key)))
    total = sum(int(np.prod(d.shape)) for d in plan)
    monkeypatch.setattr(init_draws, "HOST_CHUNK", 997)  # a prime: boundaries fall inside parameters
    assert total > 5 * init_draws.HOST_CHUNK and total % init_draws.HOST_CHUNK
    got = init_draws.host_draws(key, plan)
    want = jax.jit(lambda k: init_draws.batched_draws(k, plan))(key)
    assert len(got) == len(want) == len(plan)
    for g, w, d in zip(got, want, plan):
        assert g.shape == d.shape and g.dtype == np.float32
        assert g.tobytes() == np.asarray(w).tobytes()


def test_only_optimizer_states_that_are_constant_zeros_are_built_on_the_host(tmp_path):
    params = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
    adam = zero_shapes(optax.adamw(1e-3).init, params)
    assert adam == jax.eval_shape(optax.adamw(1e-3).init, params)
    # The learning rate is a non-zero value in the state.
    assert zero_shapes(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3).init, params) is None
    assert zero_shapes(lambda p: p, params) is None  # the parameters themselves
    assert zero_shapes(lambda p: jax.tree.map(lambda x: -jnp.zeros_like(x), p), params) is None  # -0.0
    assert zero_shapes(lambda p: jax.tree.map(lambda x: x * 0, p), params) is None  # 0 * NaN is not 0

    # A model whose optimizer keeps non-zero state keeps the compiled init program.
    cfg, _, layout = layout_of(tmp_path, MODELS["layer-wise"])
    assert host_creator(cfg.model, layout) is not None
    hyper = dataclasses.replace(layout, optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
    assert host_creator(cfg.model, hyper) is None


def test_models_over_the_batch_limit_keep_the_compiled_init_program(tmp_path, monkeypatch):
    cfg, mesh, layout = layout_of(tmp_path, MODELS["uniform"])
    monkeypatch.setattr(init_draws, "BATCH_LIMIT", 1000)
    assert host_creator(cfg.model, layout) is None
    with backend_compiles() as compiles:
        got = programs._compile(cfg, mesh, layout).create
    assert any("create" in c for c in compiles)
    assert np.asarray(got(np.int32(0)).step) == 0
