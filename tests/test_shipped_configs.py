"""Every YAML file the kit ships parses into its config class."""

from pathlib import Path

import pytest

from elmjax import config_io
from elmjax.config import Config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "elmjax" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(TRAIN_CONFIGS) >= 2


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_training_config_parses(path):
    cfg = config_io.load(Config, path)
    assert cfg.total_steps >= 1
    # Round trip: the resolved config written into run dirs loads back equal.
    assert config_io.from_dict(Config, config_io.to_dict(cfg)) == cfg
