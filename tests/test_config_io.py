import os

import pytest

from elmjax import config_io
from elmjax.config import Config
from elmjax.config_io import ConfigError, atomic_write_text, dump_yaml, load


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_round_trip(tmp_path):
    cfg = load(Config, write(tmp_path, "train:\n  steps: 5\n"))
    assert cfg.train.steps == 5 and cfg.model.num_layers == 4
    again = load(Config, write(tmp_path, dump_yaml(cfg)))
    assert again == cfg


def test_unknown_key_names_file_path_and_suggestion(tmp_path):
    p = write(tmp_path, "model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError) as e:
        load(Config, p)
    msg = str(e.value)
    assert str(p) in msg and "model.num_layer" in msg and "did you mean 'num_layers'" in msg


def test_dotted_overrides_apply_and_are_strict(tmp_path):
    p = write(tmp_path, "train:\n  steps: 5\n")
    cfg = load(Config, p, ["model.qkv_multipliers=[0.25, 0.75]", "optimizer.lr=1e-3", "model.qkv_schedule=middle"])
    assert cfg.model.qkv_multipliers == (0.25, 0.75) and cfg.optimizer.lr == 1e-3
    with pytest.raises(ConfigError, match=r"optimizer\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load(Config, p, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load(Config, p, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load(Config, p, ["run_dir.x=1"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  steps: many\n", r"train\.steps: expected an integer or null"),
        ("model:\n  normalize_qk: 1\n", r"model\.normalize_qk: expected true/false"),
        ("execution:\n  dtype: float16\n", r"execution\.dtype: 'float16' is not one of"),
        ("model:\n  dtype: bfloat16\n", r"model\.dtype: moved to 'execution\.dtype'"),
        ("train:\n  grad_accum: 2\n", r"train\.grad_accum: moved to 'execution\.grad_accum'"),
        ("model:\n  qkv_multipliers: [0.5, 0.25]\n", r"model: .*min <= max"),
        ("train:\n  steps: 3\n  tokens: 100\n", "exactly one of train.steps or train.tokens"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("model: [1\n", "invalid YAML"),
        ("model: 3\n", r"model: expected a mapping for ModelConfig"),
    ],
)
def test_bad_values_are_clear(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load(Config, write(tmp_path, text))


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.model.num_layers = 3  # type: ignore[misc]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    atomic_write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        config_io.load_yaml("nope.yaml")


def test_head_multiple_one_is_not_part_of_run_identity():
    from elmjax.config import identity

    # Runs made before the field existed keep their names and resume checks.
    assert "head_multiple" not in identity(Config())["model"]
    rounded = Config().replace(model=Config().model.replace(head_multiple=2))
    assert identity(rounded)["model"]["head_multiple"] == 2
