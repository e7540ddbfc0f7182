"""Training-token budgets of the ``tokens`` axis.

A value is one of:

* a number: a fixed token count (``2e6``);
* ``{per_param: R}``: R tokens per (total) parameter, e.g. 20 (Chinchilla);
* ``{flops: C}``: tokens = C / train_flops_per_token(model, seq_len), the
  exact FLOPs from ``elmjax.layout`` (the "C / 6N" rule without the 6N
  approximation).

The trainer rounds tokens up to whole steps; ``trained_tokens`` is what it
actually trains on. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from elmjax.layout import param_counts, train_flops_per_token
from elmjax.model_config import ModelConfig
from sweeps.naming import compact_number

_FORMS = ("per_param", "flops")


@dataclass(frozen=True)
class TokenSpec:
    kind: Literal["count", "per_param", "flops"]
    value: float

    @property
    def label(self) -> str:
        if self.kind == "count":
            return f"T{compact_number(self.value)}"
        if self.kind == "per_param":
            return f"T{compact_number(self.value)}xN"
        return f"TC{compact_number(self.value)}"


def parse_tokens(value) -> TokenSpec:
    """A TokenSpec from a grid value; ValueError with the reason if malformed."""
    if isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads '2e6' as a string
        except ValueError:
            raise ValueError(f"expected a token count, {{per_param: R}} or {{flops: C}}, got {value!r}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 1 or value != int(value):
            raise ValueError(f"a token count must be a whole number >= 1, got {value!r}")
        return TokenSpec("count", float(value))
    if isinstance(value, dict) and len(value) == 1:
        (key, amount), = value.items()
        if key not in _FORMS:
            from elmjax.config_io import suggest

            raise ValueError(f"unknown token form '{key}'{suggest(str(key), _FORMS)}; expected per_param or flops")
        amount = float(amount) if isinstance(amount, str) else amount
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"{key}: expected a positive number, got {amount!r}")
        return TokenSpec(key, float(amount))
    raise ValueError(f"expected a token count, {{per_param: R}} or {{flops: C}}, got {value!r}")


def resolve_tokens(spec: TokenSpec, model: ModelConfig, seq_len: int) -> int:
    """The token count to put in ``train.tokens`` for ``model``."""
    if spec.kind == "count":
        return int(spec.value)
    if spec.kind == "per_param":
        return max(1, math.ceil(spec.value * param_counts(model).total))
    return max(1, round(spec.value / train_flops_per_token(model, seq_len)))


def trained_tokens(tokens: int, tokens_per_step: int) -> int:
    """Tokens the trainer actually consumes: whole steps, at least one."""
    return max(1, math.ceil(tokens / tokens_per_step)) * tokens_per_step
