"""The training config: one frozen dataclass per concern, composed in ``Config``.

Loaded with ``elmjax.config_io.load(Config, path, overrides)``; the resolved
config is written to every run directory as ``config.yaml``. Pure Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from elmjax.model_config import ModelConfig


@dataclass(frozen=True)
class DataConfig:
    # 'stdlib': the running Python's standard library sources (no download).
    source: Literal["stdlib", "text", "jsonl", "parquet", "arrayrecord"] = "stdlib"
    paths: tuple[str, ...] = ()  # files or globs for text/jsonl/parquet/arrayrecord
    text_field: str = "text"  # field holding the document in jsonl/parquet
    tokenizer: str = "byte"  # 'byte' | 'sentencepiece:PATH' | 'hf:PATH' (tokenizer.json)
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 8  # global sequences per optimizer step
    seed: int = 0  # shuffle seed: same seed => same batches whatever the model
    val_fraction: float = 0.05  # fraction of documents (files for stdlib) held out
    val_sequences: int = 32  # fixed number of held-out sequences for evaluation
    # Held-out sequences after the validation ones, scored once at the end (final.json test_*);
    # 0 = no test split, which leaves train and validation data as they are either way.
    test_sequences: int = 0
    max_documents: int | None = None  # cap on documents read (quick experiments)

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1 or self.val_sequences < 1:
            raise ValueError("seq_len must be >= 2, batch_size and val_sequences >= 1")
        if self.test_sequences < 0:
            raise ValueError(f"test_sequences must be >= 0 (0 = no test split), got {self.test_sequences}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.source != "stdlib" and not self.paths:
            raise ValueError(f"data.source '{self.source}' needs data.paths")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1 (or null for all), got {self.max_documents}")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-3  # peak learning rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and embeddings, never on norm weights
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of peak
    clip_norm: float = 1.0  # global gradient norm; <= 0 disables
    z_loss: float = 0.0  # weight of log(Z)^2 auxiliary loss

    def __post_init__(self):
        # Messages name the field; config_io prefixes the file and the section ('optimizer').
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ValueError(f"need lr > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        for name in ("weight_decay", "z_loss", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # optimizer steps; or give 'tokens'
    tokens: int | None = None  # training tokens; steps = ceil(tokens / (batch * seq_len))
    seed: int = 0  # parameter init seed
    log_every: int = 10
    eval_every: int = 100  # and always at the end
    progress: bool = True  # tqdm progress bar
    MOVED_KEYS: ClassVar[dict[str, str]] = {"grad_accum": "execution.grad_accum"}

    def __post_init__(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of train.steps or train.tokens")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            raise ValueError("train.steps / train.tokens must be >= 1")
        if self.log_every < 1 or self.eval_every < 1:
            raise ValueError("log_every and eval_every must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 100  # steps between saves (also at the end and on SIGTERM/SIGINT)
    keep: int = 2  # most recent checkpoints kept
    async_save: bool = True

    def __post_init__(self):
        # keep=0 would end a run "done" with no checkpoint (the model lost);
        # every=0 would divide by zero mid-run. Turn checkpoints off with
        # checkpoint.enabled=false instead.
        if self.every < 1:
            raise ValueError(f"checkpoint.every must be >= 1 step, got {self.every} (use checkpoint.enabled=false to turn checkpoints off)")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1 (the final model is a checkpoint), got {self.keep}")


@dataclass(frozen=True)
class ExecutionConfig:
    """How a run executes, not what it computes: none of this is part of a
    run's identity, so a run (or a whole sweep) can resume with remat on, with
    more micro-batches, in another dtype or on another machine. Results agree
    up to floating-point rounding (bfloat16 changes them more than that: keep
    it fixed within a comparison)."""

    dtype: Literal["float32", "bfloat16"] = "float32"  # activations and matmuls; parameters stay float32
    remat: bool = False  # recompute each layer in the backward pass
    grad_accum: int = 1  # micro-batches per step (batch_size must divide)
    attention: Literal["auto", "xla", "cudnn", "splash"] = "xla"  # see elmjax.attention
    # Positions per chunk of the cross-entropy (elmjax.loss): the float32
    # [B, L, V] logits are never materialised at once; 0 computes them whole.
    loss_chunk: int = 0

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")

    @property
    def model_kwargs(self) -> dict:
        """The keywords ``OpenELM`` takes from this section."""
        return {"dtype": self.dtype, "remat": self.remat, "attention": self.attention}


@dataclass(frozen=True)
class MeshConfig:
    # Device mesh axis sizes; one of data/fsdp/tensor may be -1 (the rest).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Data parallelism across TPU slices (or hosts) over the slower DCN
    # network: the batch is split over (dcn_data, data, fsdp), and only the
    # gradient reduction crosses DCN. Must equal the slice count when devices
    # span several slices.
    dcn_data: int = 1

    def __post_init__(self):
        if self.dcn_data < 1:
            raise ValueError(f"mesh.dcn_data must be >= 1, got {self.dcn_data}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    run_dir: str = "runs/default"
    name: str = ""
    # Persistent XLA compilation cache; '' disables it.
    compilation_cache: str = "~/.cache/elmjax/xla"

    def __post_init__(self):
        if self.data.seq_len > self.model.max_context_length:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) is longer than model.max_context_length "
                f"({self.model.max_context_length}); lower data.seq_len or raise model.max_context_length"
            )
        if self.data.batch_size % self.execution.grad_accum:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by execution.grad_accum "
                f"({self.execution.grad_accum})"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        return max(1, math.ceil(self.train.tokens / self.tokens_per_step))

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


# Fields that do not change what a run computes: where it lives, and what may
# change when it resumes (execution policy, mesh shape, checkpointing, logging
# cadence). A run directory is resumed only by a config with the same
# identity, and sweeps hash the identity into run names.
NOT_IDENTITY = ("run_dir", "name", "execution", "mesh", "compilation_cache", "checkpoint",
                "train.progress", "train.log_every", "train.eval_every")


def identity(cfg: Config) -> dict:
    """The part of a config that identifies a run, as a plain dict."""
    from elmjax.config_io import to_dict

    d = to_dict(cfg)
    # head_multiple=1 is the layout every run had before the field existed:
    # leaving it out keeps those runs' names and resume checks.
    if d["model"].get("head_multiple") == 1:
        del d["model"]["head_multiple"]
    # Likewise the standard parametrization; mup_base_width is read only under muP.
    if d["model"].get("parametrization") == "standard":
        del d["model"]["parametrization"]
        d["model"].pop("mup_base_width", None)
    # Likewise no test split (test_sequences=0), the only behaviour before the field existed.
    if d["data"].get("test_sequences") == 0:
        del d["data"]["test_sequences"]
    for key in NOT_IDENTITY:
        section, _, field = key.partition(".")
        if field:
            d[section].pop(field, None)
        else:
            d.pop(section, None)
    return d
