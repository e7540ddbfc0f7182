"""Budget matching: find the width (and, for uniform twins, multipliers) that hits a budget.

The solver itself (widths, uniform twins) is ``elmjax.budget_match``, shared
with ``elmjax.bench``; this module adds the measures a grid's budget kinds
name. Pure Python.
"""

from __future__ import annotations

from elmjax.budget_match import (AUTO_STEPS, COARSE_SLACK, BudgetError, Fit, Measure, solve_twin,  # noqa: F401
                                 solve_width, uniform_model)
from elmjax.layout import param_counts, train_flops_per_token
from elmjax.model_config import ModelConfig
from sweeps.tokens import TokenSpec, resolve_tokens, trained_tokens

KINDS = ("params", "non_embedding_params", "flops")


def make_measure(kind: str, seq_len: int, tokens_per_step: int, tokens: TokenSpec | int) -> Measure:
    """The quantity a ``kind`` budget constrains, as a function of the model.

    ``tokens`` is the token spec of the run, or a fixed token count."""
    if kind == "params":
        return lambda m: float(param_counts(m).total)
    if kind == "non_embedding_params":
        return lambda m: float(param_counts(m).non_embedding)
    if kind != "flops":
        raise ValueError(f"unknown budget kind {kind!r}")

    def flops(m: ModelConfig) -> float:
        count = tokens if isinstance(tokens, int) else resolve_tokens(tokens, m, seq_len)
        return float(train_flops_per_token(m, seq_len)) * trained_tokens(count, tokens_per_step)

    return flops
