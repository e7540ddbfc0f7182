import subprocess
import sys

import numpy as np
import pytest

from elmjax.layout import (
    kv_cache_bytes_per_token,
    layer_layout,
    layer_multipliers,
    main,
    make_divisible,
    param_counts,
    per_layer_params,
    train_flops_per_token,
    forward_flops_per_token,
)
from elmjax.model_config import ModelConfig, preset

PUBLISHED_TOTALS = {
    "OpenELM-270M": 271_527_168,
    "OpenELM-450M": 457_179_136,
    "OpenELM-1_1B": 1_079_891_456,
    "OpenELM-3B": 3_036_647_424,
}


@pytest.mark.parametrize("name", list(PUBLISHED_TOTALS))
def test_preset_total_params_are_exact(name):
    assert param_counts(preset(name)).total == PUBLISHED_TOTALS[name]


def test_270m_layout_matches_released_config():
    # Values from Apple's released OpenELM-270M config.json.
    lay = layer_layout(preset("OpenELM-270M"))
    assert [x.q_heads for x in lay] == [12] * 5 + [16] * 7 + [20] * 4
    assert [x.kv_heads for x in lay] == [3] * 5 + [4] * 7 + [5] * 4
    assert layer_multipliers((0.5, 4.0), "linear", 16)[:4] == (0.5, 0.73, 0.97, 1.2)


def test_make_divisible_mobilenet_rule():
    assert make_divisible(100, 8) == 104  # nearest multiple
    assert make_divisible(3, 8) == 8  # at least one multiple
    assert make_divisible(1000, 256) == 1024
    # Rounding 1.5*256=384 to the nearest multiple of 256 gives 512 (ties up);
    # 300 rounds to 256, which is >10% below 300? 256 < 270 -> bumped to 512.
    assert make_divisible(300, 256) == 512
    assert make_divisible(260, 256) == 256


def test_scalar_multiplier_is_uniform():
    cfg = ModelConfig(num_layers=5, qkv_multipliers=1.0, ffn_multipliers=2.0)
    assert len(set(layer_layout(cfg))) == 1


@pytest.mark.parametrize("schedule", ["reverse", "middle", "ends", "constant"])
def test_schedules_shape_over_depth(schedule):
    n = 7
    lin = np.array(layer_multipliers((0.5, 1.5), "linear", n))
    got = np.array(layer_multipliers((0.5, 1.5), schedule, n))
    assert got.min() >= 0.5 - 1e-9 and got.max() <= 1.5 + 1e-9
    if schedule == "reverse":
        np.testing.assert_allclose(got, lin[::-1])
    elif schedule == "middle":
        assert got.argmax() == n // 2 and got[0] == got[-1] == 0.5
    elif schedule == "ends":
        assert got.argmin() == n // 2 and got[0] == got[-1] == 1.5
    else:
        np.testing.assert_allclose(got, 1.0)


def test_explicit_per_layer_list():
    cfg = ModelConfig(num_layers=3, model_dim=128, head_dim=32, num_gqa_groups=1,
                      qkv_multipliers=[0.25, 1.0, 0.5], ffn_multipliers=[1.0, 1.0, 4.0])
    lay = layer_layout(cfg)
    assert [x.q_heads for x in lay] == [1, 4, 2]
    assert [x.ffn_dim for x in lay] == [128, 128, 512]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"qkv_multipliers": (1.0, 0.5)}, "min <= max"),
        ({"ffn_multipliers": (1.0, 2.0, 3.0)}, "per-layer values"),
        ({"qkv_multipliers": -1.0}, "positive"),
        ({"head_dim": 31}, "even"),
        ({"qkv_schedule": "zigzag"}, "zigzag"),
    ],
)
def test_invalid_model_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(num_layers=4, **kwargs)


def test_per_layer_params_sum_to_non_embedding():
    cfg = preset("OpenELM-450M")
    counts = param_counts(cfg)
    assert sum(per_layer_params(cfg)) + cfg.model_dim == counts.non_embedding
    assert counts.embedding == cfg.vocab_size * cfg.model_dim


def test_untied_embeddings_count_the_head():
    cfg = ModelConfig()
    untied = cfg.replace(tie_embeddings=False)
    assert param_counts(untied).total - param_counts(cfg).total == cfg.vocab_size * cfg.model_dim


def test_train_flops_are_three_forwards_and_grow_with_context():
    cfg = preset("OpenELM-270M")
    assert train_flops_per_token(cfg, 2048) == 3 * forward_flops_per_token(cfg, 2048)
    lay = layer_layout(cfg)
    attn_per_token_per_ctx = 3 * sum(4 * x.q_heads * cfg.head_dim for x in lay)
    assert train_flops_per_token(cfg, 2048) - train_flops_per_token(cfg, 1024) == attn_per_token_per_ctx * 1024
    # 6N rule of thumb (matmul params, head counted) within a few percent at short context.
    n_matmul = param_counts(cfg).non_embedding + cfg.vocab_size * cfg.model_dim
    assert abs(train_flops_per_token(cfg, 1) / (6 * n_matmul) - 1) < 0.01


def test_kv_cache_bytes():
    cfg = preset("OpenELM-270M")
    kv = sum(x.kv_heads for x in layer_layout(cfg))
    assert kv_cache_bytes_per_token(cfg) == 2 * kv * cfg.head_dim * 2
    assert kv_cache_bytes_per_token(cfg, 4) == 2 * kv_cache_bytes_per_token(cfg)


def test_cli_prints_table_and_plots(tmp_path, capsys):
    png = tmp_path / "alloc.png"
    assert main(["OpenELM-270M", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "271,527,168" in out and len(out.splitlines()) > 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_yaml_with_overrides(tmp_path, capsys):
    f = tmp_path / "m.yaml"
    f.write_text("model:\n  num_layers: 3\n  model_dim: 64\n  head_dim: 16\n  num_gqa_groups: 1\n")
    assert main([str(f), "qkv_schedule=reverse"]) == 0
    assert "reverse" not in capsys.readouterr().err


def test_cli_bad_inputs(tmp_path, capsys):
    assert main(["OpenELM-270m"]) == 2
    assert "did you mean 'OpenELM-270M'" in capsys.readouterr().err
    f = tmp_path / "m.yaml"
    f.write_text("model:\n  num_layer: 3\n")
    assert main([str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "num_layer" in err and "num_layers" in err


def test_layout_does_not_import_jax():
    code = "import sys, elmjax.layout, elmjax.config, elmjax.run_dir; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
