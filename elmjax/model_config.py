"""The frozen model config and the released OpenELM presets.

Multipliers (``qkv_multipliers`` = alpha, ``ffn_multipliers`` = beta) take
one of three forms, exactly as OpenELM's own config does, plus named schedules:

* a number: every layer gets it (uniform allocation);
* a pair ``[min, max]``: bounds, spread over depth by ``*_schedule``
  (``linear`` is OpenELM's ``numpy.linspace``);
* a list of ``num_layers`` numbers: an explicit per-layer allocation.

Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

SCHEDULES = ("linear", "reverse", "middle", "ends", "constant")
Schedule = Literal["linear", "reverse", "middle", "ends", "constant"]
# How initialisation, attention scale, logit multiplier and per-matrix
# learning rates depend on width: see ``elmjax.mup`` for the exact rules.
PARAMETRIZATIONS = ("standard", "mup")
Parametrization = Literal["standard", "mup"]
Multipliers = float | tuple[float, ...]


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 4
    model_dim: int = 128
    head_dim: int = 32
    num_gqa_groups: int = 2
    qkv_multipliers: Multipliers = (0.5, 1.0)
    ffn_multipliers: Multipliers = (0.5, 4.0)
    qkv_schedule: Schedule = "linear"
    ffn_schedule: Schedule = "linear"
    ffn_dim_divisor: int = 32
    ffn_with_glu: bool = True
    normalize_qk: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    max_context_length: int = 2048
    vocab_size: int = 259
    norm_eps: float = 1e-6
    # Round every layer's kv head count to a multiple of this (its query
    # heads follow, G per kv head). Set it to the tensor-parallel size when
    # planning a sweep for TP, so every layer splits into whole kv groups;
    # 1 is OpenELM's own layout, exactly.
    head_multiple: int = 1
    # 'standard' is OpenELM's own parametrization; 'mup' follows each matrix's
    # fan-in (elmjax.mup), relative to a model of width ``mup_base_width``,
    # which only muP reads. Neither is part of a run's identity at its default.
    parametrization: Parametrization = "standard"
    mup_base_width: int = 128
    # Compute dtype and rematerialisation are not here: they say how a run
    # executes, not what the model is (``elmjax.config.ExecutionConfig``).
    MOVED_KEYS: ClassVar[dict[str, str]] = {"dtype": "execution.dtype", "remat": "execution.remat"}

    def __post_init__(self):
        for name in ("num_layers", "model_dim", "head_dim", "num_gqa_groups", "ffn_dim_divisor", "vocab_size",
                     "max_context_length", "head_multiple", "mup_base_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")
        # Normalise lists to tuples so the config stays hashable and frozen.
        for name in ("qkv_multipliers", "ffn_multipliers"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(float(v) for v in value))
            _check_multipliers(name, getattr(self, name), self.num_layers)
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization: {self.parametrization!r} is not one of {list(PARAMETRIZATIONS)}")
        for name in ("qkv_schedule", "ffn_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {list(SCHEDULES)}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check_multipliers(name: str, value: Multipliers, num_layers: int) -> None:
    values = (value,) if isinstance(value, (int, float)) else value
    if not values:
        raise ValueError(f"{name}: must not be empty")
    if any(v <= 0 for v in values):
        raise ValueError(f"{name}: multipliers must be positive, got {value}")
    if isinstance(value, tuple):
        if len(value) == 2 and value[0] > value[1]:
            raise ValueError(
                f"{name}: bounds [min, max] need min <= max, got {list(value)}; "
                "for wide-early allocation use the 'reverse' schedule"
            )
        if len(value) not in (2, num_layers):
            raise ValueError(
                f"{name}: expected a number, [min, max] bounds or {num_layers} per-layer values, got {len(value)} values"
            )


def _openelm(num_layers: int, model_dim: int, head_dim: int) -> ModelConfig:
    return ModelConfig(
        num_layers=num_layers,
        model_dim=model_dim,
        head_dim=head_dim,
        num_gqa_groups=4,
        qkv_multipliers=(0.5, 1.0),
        ffn_multipliers=(0.5, 4.0),
        ffn_dim_divisor=256,
        vocab_size=32000,
        rope_theta=10000.0,
        max_context_length=2048,
        normalize_qk=True,
        tie_embeddings=True,
    )


PRESETS: dict[str, ModelConfig] = {
    "OpenELM-270M": _openelm(16, 1280, 64),
    "OpenELM-450M": _openelm(20, 1536, 64),
    "OpenELM-1_1B": _openelm(28, 2048, 64),
    "OpenELM-3B": _openelm(36, 3072, 128),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        from elmjax.config_io import suggest

        raise KeyError(f"unknown preset {name!r}{suggest(name, PRESETS)}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
