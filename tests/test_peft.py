"""LoRA / DoRA adapters (elmjax.peft): formula, step 0, gradients, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax import peft
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.peft import PeftConfig

CFG = ModelConfig(num_layers=3, model_dim=32, head_dim=8, num_gqa_groups=2, qkv_multipliers=(0.5, 1.0),
                  ffn_multipliers=(0.5, 2.0), ffn_dim_divisor=8, vocab_size=61)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7))


@pytest.fixture(scope="module")
def base():
    model = OpenELM(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def logits(graphdef, params):
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(TOKENS)))


def trained(adapters, seed=1):
    """Adapters with non-zero B (and perturbed m), as after some training."""
    rng = np.random.default_rng(seed)
    out = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), adapters)
    return out


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_step0_equals_base(base, method):
    graphdef, params = base
    cfg = PeftConfig(method=method, rank=4)
    adapters = peft.init_adapters(params, cfg, CFG.num_layers)
    want = logits(graphdef, params)
    got = logits(graphdef, peft.effective_params(params, adapters, cfg))
    if method == "lora":
        np.testing.assert_array_equal(got, want)  # W + 0 is W exactly
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # m / ||W|| rounds once
    # ... and the adapters do change the model once B moves.
    assert np.abs(logits(graphdef, peft.effective_params(params, trained(adapters), cfg)) - want).max() > 1e-3


def test_targets_and_layers_select_weights(base):
    _, params = base
    cfg = PeftConfig(rank=2, targets=("out", "ffn_in"), layers=(0, 2))
    adapters = peft.init_adapters(params, cfg, CFG.num_layers)
    assert sorted(adapters) == [0, 2] and all(sorted(a) == ["ffn_in", "out"] for a in adapters.values())
    eff = peft.effective_params(params, trained(adapters), cfg)
    changed = {(i, m, n) for i in range(CFG.num_layers) for m, n in [("attn", "qkv_DKCE"), ("attn", "out_KGED"),
                                                                    ("ffn", "in_DPF"), ("ffn", "out_FD")]
               if not np.array_equal(eff["layers"][i][m][n], params["layers"][i][m][n])}
    assert changed == {(0, "attn", "out_KGED"), (0, "ffn", "in_DPF"), (2, "attn", "out_KGED"), (2, "ffn", "in_DPF")}
    # out: A takes K*G*E inputs, B gives D outputs.
    k, g, e, d = params["layers"][0]["attn"]["out_KGED"].shape
    assert adapters[0]["out"]["A"].shape == (2, k * g * e) and adapters[0]["out"]["B"].shape == (d, 2)
    with pytest.raises(ValueError, match="out of range"):
        peft.init_adapters(params, PeftConfig(layers=(3,)), CFG.num_layers)


def test_gradients_only_for_adapters(base):
    graphdef, params = base
    cfg = PeftConfig(rank=4, targets=("qkv", "ffn_out"))
    adapters = peft.init_adapters(params, cfg, CFG.num_layers)

    def loss(ad, p):
        return jnp.mean(nnx.merge(graphdef, peft.effective_params(p, ad, cfg))(jnp.asarray(TOKENS)) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters, params)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    # B = 0 at step 0, so only B gets a non-zero gradient (A's is B^T times something).
    for per_layer in grads.values():
        for g in per_layer.values():
            assert np.abs(g["B"]).max() > 0 and np.abs(g["A"]).max() == 0
    # Every targeted weight of every layer is reached.
    assert sum(1 for per in grads.values() for _ in per) == CFG.num_layers * 2


def test_optimizer_state_scales_with_adapters(base):
    import optax

    _, params = base
    model_count = sum(x.size for x in jax.tree.leaves(params))
    sizes = []
    for rank in (2, 8):
        cfg = PeftConfig(rank=rank)
        adapters = peft.init_adapters(params, cfg, CFG.num_layers)
        opt_state = optax.adamw(1e-3).init(adapters)
        state_count = sum(x.size for x in jax.tree.leaves(opt_state))
        n = peft.count_params(adapters)
        assert state_count - 1 == 2 * n  # mu and nu per adapter parameter, plus the step count
        sizes.append(state_count)
    assert sizes[1] - 1 == 4 * (sizes[0] - 1)  # linear in the rank
    assert sizes[0] < model_count / 2


def test_dora_matches_numpy():
    rng = np.random.default_rng(3)
    n_in, n_out, r = 12, 10, 3
    cfg = PeftConfig(method="dora", rank=r, alpha=6.0)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    ad = {"A": rng.standard_normal((r, n_in)).astype(np.float32),
          "B": rng.standard_normal((n_out, r)).astype(np.float32),
          "m": rng.uniform(0.5, 2.0, n_out).astype(np.float32)}
    # Direct computation in PyTorch's [out, in] orientation.
    s = 6.0 / r
    v_oi = w.T.astype(np.float64) + s * ad["B"].astype(np.float64) @ ad["A"]
    norm_o = np.linalg.norm(v_oi, axis=1)
    want_oi = ad["m"][:, None] * v_oi / norm_o[:, None]
    got = np.asarray(peft.adapted_weight(jnp.asarray(w), ad, cfg, 1))
    np.testing.assert_allclose(got.T, want_oi, rtol=1e-5, atol=1e-6)
    # Magnitude and direction separately.
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), ad["m"], rtol=1e-5)
    np.testing.assert_allclose(got.T / np.linalg.norm(got.T, axis=1, keepdims=True), v_oi / norm_o[:, None],
                               rtol=1e-5, atol=1e-6)
    # The norm is a constant in the backward pass: d/dB sum(R * W') = s (m/n R) A^T.
    r_io = rng.standard_normal((n_in, n_out)).astype(np.float32)
    g = jax.grad(lambda b: jnp.sum(r_io * peft.adapted_weight(jnp.asarray(w), {**ad, "B": b}, cfg, 1)))(ad["B"])
    want_g = s * ((ad["m"] / norm_o)[:, None] * r_io.T) @ ad["A"].T
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_unmerge_round_trip(base, method):
    graphdef, params = base
    cfg = PeftConfig(method=method, rank=4, targets=("qkv", "out", "ffn_in", "ffn_out"))
    adapters = trained(peft.init_adapters(params, cfg, CFG.num_layers))
    merged = peft.merge(params, adapters, cfg)
    np.testing.assert_allclose(logits(graphdef, merged), logits(graphdef, peft.effective_params(params, adapters, cfg)),
                               rtol=1e-5, atol=1e-5)
    back = peft.unmerge(merged, peft.with_merge_norms(params, adapters, cfg), cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    assert np.abs(merged["layers"][1]["attn"]["qkv_DKCE"] - params["layers"][1]["attn"]["qkv_DKCE"]).max() > 1e-3


def test_bf16_base(base):
    graphdef, params = base
    cfg = PeftConfig(rank=4, base_dtype="bfloat16")
    held = peft.cast_base(params, cfg)
    assert held["layers"][0]["attn"]["qkv_DKCE"].dtype == jnp.bfloat16
    assert held["layers"][0]["attn_norm"]["weight"].dtype == jnp.float32
    adapters = peft.init_adapters(held, cfg, CFG.num_layers)
    eff = peft.effective_params(held, adapters, cfg)
    assert eff["layers"][0]["attn"]["qkv_DKCE"].dtype == jnp.float32
    np.testing.assert_allclose(logits(graphdef, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), eff)),
                               logits(graphdef, params), atol=0.05)


def test_dropout_is_deterministic_per_step(base):
    _, params = base
    cfg = PeftConfig(rank=2, dropout=0.5, targets=("ffn_out",))
    adapters = trained(peft.init_adapters(params, cfg, CFG.num_layers))
    w = lambda step: np.asarray(peft.effective_params(params, adapters, cfg, step=step)["layers"][0]["ffn"]["out_FD"])
    np.testing.assert_array_equal(w(3), w(3))
    assert not np.array_equal(w(3), w(4))
    nodrop = np.asarray(peft.effective_params(params, adapters, cfg)["layers"][0]["ffn"]["out_FD"])
    assert not np.array_equal(w(3), nodrop)


@pytest.mark.parametrize("bad, match", [({"rank": 0}, "rank"), ({"targets": ("qkv", "mlp")}, "unknown target"),
                                        ({"layers": "late"}, "layers"), ({"dropout": 1.0}, "dropout")])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        PeftConfig(**bad)
