"""The fine-tuning config: a base checkpoint, adapters, data and a gentler optimizer.

Loaded with ``elmjax.config_io.load(FinetuneConfig, path, overrides)``; the
model is not configured here: it is whatever ``init_from`` holds. Pure Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from elmjax.config import (NOT_IDENTITY, CheckpointConfig, Config, DataConfig, ExecutionConfig, MeshConfig,
                           OptimizerConfig, TrainConfig)
from elmjax.model_config import ModelConfig
from elmjax.peft import PeftConfig
from elmjax.sft_config import SFTConfig


def finetune_optimizer() -> OptimizerConfig:
    # Adapters start at the base model: a pretraining lr (3e-3) would wreck it
    # in a few steps. LoRA recipes use 1e-4 .. 3e-4, no decay on the adapters,
    # a short warmup and cosine to zero.
    return OptimizerConfig(lr=2e-4, warmup_steps=10, min_lr_ratio=0.0, weight_decay=0.0)


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = ()  # multiple-choice JSONL files scored before and after (elmjax.evaluate)
    token_budget: int | None = None  # tokens per scoring batch


@dataclass(frozen=True)
class FinetuneConfig:
    init_from: str = ""  # a Hugging Face OpenELM directory or a training run directory
    peft: PeftConfig = field(default_factory=PeftConfig)
    # Plain-text data (as training reads it) unless ``sft`` names chat files;
    # data.tokenizer must be the base model's tokenizer.
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optimizer: OptimizerConfig = field(default_factory=finetune_optimizer)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/finetune"
    name: str = ""
    compilation_cache: str = "~/.cache/elmjax/xla"

    def __post_init__(self):
        if not self.init_from:
            raise ValueError("init_from: give the base model (a Hugging Face OpenELM directory or a run directory)")

    @property
    def total_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        return max(1, math.ceil(self.train.tokens / (self.data.batch_size * self.data.seq_len)))

    def training(self, model: ModelConfig) -> Config:
        """The training Config the step loop runs (``elmjax.train``), for the base ``model``."""
        return Config(model=model, data=self.data, optimizer=self.optimizer, train=self.train,
                      checkpoint=self.checkpoint, execution=self.execution, mesh=self.mesh, run_dir=self.run_dir,
                      name=self.name, compilation_cache=self.compilation_cache)

    def replace(self, **changes) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)


def identity(cfg: FinetuneConfig) -> dict:
    """What identifies a fine-tuning run (same exclusions as training's)."""
    from elmjax.config_io import to_dict

    d = to_dict(cfg)
    for key in NOT_IDENTITY:
        section, _, sub = key.partition(".")
        if sub:
            d[section].pop(sub, None)
        else:
            d.pop(section, None)
    return d
