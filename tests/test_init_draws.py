"""elmjax.init_draws: the batched draw gives every parameter the bits of drawing it from its own key."""

import jax
import numpy as np
import pytest
from flax import nnx

from elmjax import init_draws
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.programs import CPU_INIT_OPTIONS
from elmjax.state import init_params

LAYERWISE = ModelConfig(num_layers=4, model_dim=77, head_dim=16, num_gqa_groups=2, qkv_multipliers=(0.5, 1.0),
                        ffn_multipliers=(0.5, 4.0), ffn_dim_divisor=16, vocab_size=259)
MODELS = {
    "layer-wise": LAYERWISE,
    "uniform": LAYERWISE.replace(qkv_multipliers=(1.0, 1.0), ffn_multipliers=(2.0, 2.0)),
    "untied-middle": LAYERWISE.replace(tie_embeddings=False, qkv_schedule="middle", num_layers=3),
    "mup": LAYERWISE.replace(parametrization="mup"),
}


def per_parameter(cfg, seed):
    """The reference: each random parameter drawn from its own key by the model itself."""
    return nnx.to_pure_dict(nnx.state(OpenELM(cfg, rngs=nnx.Rngs(jax.random.key(seed))), nnx.Param))


def compiled(fn, cfg, options):
    return jax.jit(lambda seed: fn(cfg, seed)).lower(np.int32(0)).compile(compiler_options=options)


def leaves_bytes(tree):
    return [(jax.tree_util.keystr(path), np.asarray(leaf).tobytes())
            for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_draws_give_every_parameter_the_same_bits(name):
    cfg = MODELS[name]
    key = jax.random.key(0)
    plan = init_draws.draw_plan(lambda: OpenELM(cfg, rngs=nnx.Rngs(key)))
    assert init_draws.usable(plan, key)  # the batched path is the one under test
    for options in (CPU_INIT_OPTIONS, {}):
        batched, reference = compiled(init_params, cfg, options), compiled(per_parameter, cfg, options)
        # Two different programs: one threefry per parameter (and one key per parameter) against one for all.
        assert batched.as_text().count(" fusion(") < reference.as_text().count(" fusion(") / 2
        for seed in (0, 7, 2**31 - 1):
            got, want = leaves_bytes(batched(np.int32(seed))), leaves_bytes(reference(np.int32(seed)))
            assert [p for p, _ in got] == [p for p, _ in want]
            assert got == want, f"{name}, seed {seed}, {options}: parameters differ"


def test_the_plan_lists_every_random_parameter_in_draw_order():
    cfg = MODELS["untied-middle"]
    plan = init_draws.draw_plan(lambda: OpenELM(cfg, rngs=nnx.Rngs(0)))
    params = jax.eval_shape(lambda: per_parameter(cfg, 0))
    matrices = [x for x in jax.tree.leaves(params) if x.ndim >= 2]  # norm weights are ones, not drawn
    assert len(plan) == len(matrices)
    assert sorted(d.shape for d in plan) == sorted(x.shape for x in matrices)
    assert plan[0].shape == (cfg.vocab_size, cfg.model_dim)  # the embedding is drawn first
    assert plan[-1].shape == (cfg.model_dim, cfg.vocab_size)  # the untied head last


def test_models_over_the_batch_limit_draw_per_parameter_with_the_same_bits(monkeypatch):
    cfg = MODELS["layer-wise"]
    monkeypatch.setattr(init_draws, "BATCH_LIMIT", 1000)
    key = jax.random.key(0)
    assert not init_draws.usable(init_draws.draw_plan(lambda: OpenELM(cfg, rngs=nnx.Rngs(key))), key)
    program = compiled(init_params, cfg, CPU_INIT_OPTIONS)
    assert leaves_bytes(program(np.int32(5))) == leaves_bytes(compiled(per_parameter, cfg, CPU_INIT_OPTIONS)(
        np.int32(5)))


def test_a_model_that_draws_other_parameters_than_planned_is_an_error():
    key = jax.random.key(0)
    planned, other = MODELS["layer-wise"], MODELS["uniform"]
    with pytest.raises(RuntimeError, match="does not match"):
        with init_draws.drawn_in_batch(lambda: OpenELM(planned, rngs=nnx.Rngs(key)), key):
            OpenELM(other, rngs=nnx.Rngs(key))
