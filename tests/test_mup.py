"""muP (elmjax.mup): coordinate check across widths, per-layer lr multipliers, standard unchanged, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax import config_io, mup
from elmjax.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig, identity
from elmjax.layout import layer_layout
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.optim import lr_schedule
from elmjax.sharding import make_mesh
from elmjax.state import abstract_model, state_layout
from elmjax.train_step import make_train_step
from sweeps.naming import config_hash

WIDTHS = (64, 128, 256, 512)
STEPS, LR, BASE = 5, 1e-2, 64


def _scales(parametrization: str, width: int) -> dict[str, float]:
    """RMS of the logits after STEPS AdamW steps, and of the change of the last
    hidden state over them, trained through the production state and step."""
    model = ModelConfig(num_layers=2, model_dim=width, head_dim=16, vocab_size=259, max_context_length=32,
                        parametrization=parametrization, mup_base_width=BASE)
    config = Config(model=model, data=DataConfig(seq_len=32, batch_size=4), train=TrainConfig(steps=STEPS),
                    optimizer=OptimizerConfig(lr=LR, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, clip_norm=0.0))
    layout = state_layout(config, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    graphdef, _ = abstract_model(model)
    step = jax.jit(make_train_step(graphdef, layout.optimizer, lr_schedule(config.optimizer, STEPS), z_loss=0.0,
                                   grad_accum=1))
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 259, (4, 33)), jnp.int32)

    def activations(params):
        m = nnx.merge(graphdef, params)
        h = m.hidden(batch[:, :-1])
        return h, m.logits(h)

    @jax.jit
    def measure(params0, params):
        (h0, _), (h, z) = activations(params0), activations(params)
        rms = lambda a: jnp.sqrt(jnp.mean(jnp.square(a)))
        return {"logits": rms(z), "dhidden": rms(h - h0)}

    state = layout.create()  # eager: its per-op programs are shared by both parametrizations at one width
    params0 = state.params
    for _ in range(STEPS):
        state, _ = step(state, batch)
    return {k: float(v) for k, v in measure(params0, state.params).items()}


@pytest.fixture(scope="module")
def coord_table():
    # Standard needs only the two ends to show its growth; each width costs ~5 s of compiling.
    table = {"mup": [_scales("mup", w) for w in WIDTHS],
             "standard": [_scales("standard", w) for w in (WIDTHS[0], WIDTHS[-1])]}
    for p, rows in table.items():
        for key in rows[0]:
            print(p, key, " ".join(f"{r[key]:.3f}" for r in rows))
    return table


def _spread(rows, key):
    values = [r[key] for r in rows]
    return max(values) / min(values)


def test_coordinate_check_flat_under_mup_and_growing_under_standard(coord_table):
    # Measured (lr 1e-2, 5 steps, widths 64..512): standard dhidden 1.43 -> 59.8
    # (41.8x), logits 1.13 -> 3.38; muP dhidden max/min 1.21, logits 1.64.
    # Without the lr multipliers muP's dhidden spreads 51x; without the logit
    # multiplier its logits spread 3.5x: the bounds catch both.
    mu, sp = coord_table["mup"], coord_table["standard"]
    assert _spread(mu, "dhidden") < 1.5
    assert _spread(mu, "logits") < 2.2
    assert sp[-1]["dhidden"] > 10 * sp[0]["dhidden"]
    assert sp[-1]["logits"] > 2 * sp[0]["logits"]


LAYERWISE = ModelConfig(num_layers=4, model_dim=128, head_dim=16, num_gqa_groups=2, qkv_multipliers=(0.5, 1.0),
                        ffn_multipliers=(0.5, 4.0), ffn_dim_divisor=16, vocab_size=101, parametrization="mup",
                        mup_base_width=64)


def _abstract_params(cfg):
    return nnx.to_pure_dict(abstract_model(cfg)[1])


def test_lr_multipliers_follow_each_layers_own_fan_in():
    cfg = LAYERWISE
    params = _abstract_params(cfg)
    mult, fans = mup.lr_multipliers(cfg, params), mup.fan_ins(params)
    b, d, e = cfg.mup_base_width, cfg.model_dim, cfg.head_dim
    lays = layer_layout(cfg)
    for i, lay in enumerate(lays):
        attn, ffn = mult["layers"][i]["attn"], mult["layers"][i]["ffn"]
        assert fans["layers"][i]["attn"]["out_KGED"] == lay.q_heads * e
        assert fans["layers"][i]["ffn"]["out_FD"] == lay.ffn_dim
        assert attn["qkv_DKCE"] == ffn["in_DPF"] == pytest.approx(b / d)
        assert attn["out_KGED"] == pytest.approx(b / (lay.q_heads * e))
        assert ffn["out_FD"] == pytest.approx(b / lay.ffn_dim)
        assert attn["q_norm"]["weight"] == mult["layers"][i]["attn_norm"]["weight"] == 1.0
    # Layer-wise widths really give different multipliers per layer.
    assert len({lay.ffn_dim for lay in lays}) == cfg.num_layers
    assert len({mult["layers"][i]["ffn"]["out_FD"] for i in range(cfg.num_layers)}) == cfg.num_layers
    assert len({mult["layers"][i]["attn"]["out_KGED"] for i in range(cfg.num_layers)}) > 1
    assert mult["embed_VD"] == mult["norm"]["weight"] == 1.0
    untied = cfg.replace(tie_embeddings=False)
    assert mup.lr_multipliers(untied, _abstract_params(untied))["head_DV"] == pytest.approx(b / d)


def test_mup_init_attention_scale_and_logit_multiplier():
    cfg = LAYERWISE.replace(vocab_size=2000)
    model = OpenELM(cfg, rngs=nnx.Rngs(0))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    depth = (2 * cfg.num_layers) ** -0.5
    for i, lay in enumerate(layer_layout(cfg)):
        assert np.std(p["layers"][i]["attn"]["qkv_DKCE"]) == pytest.approx(cfg.model_dim**-0.5, rel=0.05)
        assert np.std(p["layers"][i]["attn"]["out_KGED"]) == pytest.approx((lay.q_heads * 16) ** -0.5 * depth, rel=0.1)
        assert np.std(p["layers"][i]["ffn"]["out_FD"]) == pytest.approx(lay.ffn_dim**-0.5 * depth, rel=0.1)
    assert np.std(p["embed_VD"]) == pytest.approx(cfg.mup_base_width**-0.5, rel=0.05)
    assert all(layer.attn.scale == 1 / 16 for layer in model.layers)
    assert model.logit_multiplier == cfg.mup_base_width / cfg.model_dim
    untied = OpenELM(cfg.replace(tie_embeddings=False), rngs=nnx.Rngs(0))
    assert untied.logit_multiplier == 1.0
    assert np.std(np.asarray(untied.head_DV[...])) == pytest.approx(cfg.mup_base_width**0.5 / cfg.model_dim, rel=0.05)


def test_standard_parametrization_changes_no_number_and_no_run_name():
    # Pinned before muP existed (same config, seed and tokens).
    cfg = ModelConfig(num_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, vocab_size=101)
    model = OpenELM(cfg, rngs=nnx.Rngs(0))
    out = np.asarray(model(jnp.arange(12)[None] % 101))
    params = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert float(np.abs(out).sum()) == pytest.approx(956.4036254882812, rel=1e-6)
    assert float(sum(np.abs(np.asarray(x)).sum() for x in params)) == pytest.approx(10306.20703125, rel=1e-6)
    assert mup.lr_multipliers(cfg, _abstract_params(cfg)) is None
    assert config_hash(Config()) == "5dac2528"
    assert "parametrization" not in identity(Config())["model"]
    assert "mup_base_width" not in identity(Config(model=ModelConfig(mup_base_width=256)))["model"]  # unread
    # ... and both are part of a muP run's identity.
    mu = Config(model=ModelConfig(parametrization="mup"))
    assert identity(mu)["model"]["parametrization"] == "mup"
    assert config_hash(mu) != config_hash(Config())
    assert config_hash(mu) != config_hash(Config(model=ModelConfig(parametrization="mup", mup_base_width=64)))


@pytest.mark.parametrize("text, match", [
    ("model:\n  parametrization: mupp\n", r"cfg\.yaml: model\.parametrization: 'mupp' is not one of \['standard', 'mup'\]"),
    ("model:\n  mup_base_width: 0\n", r"cfg\.yaml.*mup_base_width must be >= 1, got 0"),
])
def test_bad_parametrization_settings_are_clear(tmp_path, text, match):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(config_io.ConfigError, match=match):
        config_io.load(Config, path)
    with pytest.raises(ValueError, match="parametrization|mup_base_width"):
        ModelConfig(**config_io.load_yaml(path)["model"])


def test_cached_decoding_uses_the_mup_scales():
    from elmjax.generate import decode_step, prefill

    cfg = LAYERWISE.replace(num_layers=2, model_dim=64, max_context_length=32, mup_base_width=32)
    model = OpenELM(cfg, rngs=nnx.Rngs(2))
    seqs = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 10)))
    forward = nnx.jit(lambda m, t: m(t))
    full = np.asarray(forward(model, seqs))
    logits, caches = nnx.jit(prefill, static_argnums=2)(model, seqs[:, :8], 10)
    np.testing.assert_allclose(logits, full[:, :8], atol=2e-5, rtol=2e-5)
    step_logits, _ = nnx.jit(decode_step)(model, seqs[:, 8], jnp.array([8, 8]), caches)
    np.testing.assert_allclose(step_logits, full[:, 8], atol=2e-5, rtol=2e-5)
    # The same weights run as a standard model differ: the scales are in play.
    standard = nnx.merge(nnx.split(OpenELM(cfg.replace(parametrization="standard"), rngs=nnx.Rngs(2)))[0],
                         nnx.state(model, nnx.Param))
    assert np.abs(np.asarray(forward(standard, seqs)) - full).max() > 0.05


def test_mup_run_resumes_exactly_and_loads_as_mup(tmp_path):
    """The muP optimizer state (one more, empty, stage in the chain) goes
    through checkpoints: a run resumed from step 3 ends where the
    uninterrupted one does, and the run directory loads as a muP model."""
    import shutil

    from elmjax import run_dir as rd
    from elmjax.checkpoint import load_model
    from elmjax.train import run
    from train_helpers import tiny_config

    overrides = ("model.parametrization=mup", "model.mup_base_width=32", "train.steps=6", "checkpoint.every=3",
                 "train.eval_every=100", "train.log_every=1")
    ref = tmp_path / "ref"
    assert run(tiny_config(ref, *overrides)).state == "done"
    d = tmp_path / "resumed"
    shutil.copytree(ref, d)
    shutil.rmtree(d / "checkpoints" / "6")
    (d / "final.json").unlink()
    rd.write_status(d, "running", step=3, total_steps=6)
    assert run(tiny_config(d, *overrides)).state == "done"
    losses = lambda p: [r["loss"] for r in rd.read_metrics(p) if r["kind"] == "train"]
    np.testing.assert_allclose(losses(d), losses(ref), rtol=1e-5)
    model = load_model(d)
    assert model.cfg.parametrization == "mup" and model.cfg.mup_base_width == 32
    for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(load_model(ref), nnx.Param))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
