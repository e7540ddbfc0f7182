"""Budget matching at the layout level: find the width (and, for uniform twins, multipliers) that hits a budget.

A budget is any measure of the model that never decreases with its width:
total or non-embedding parameters, training FLOPs (``sweeps.budget.make_measure``,
all exact from ``elmjax.layout``). Every measure is non-decreasing in ``model_dim``
(``make_divisible`` never rounds down as its input grows), so:

1. **Width.** Bisection over integer widths finds ``d*``, the smallest width
   whose measure reaches the target. For each width step ``s`` (``auto``:
   128, 64, 32, 16, 8, 4, 2, 1) the multiples of ``s`` nearest ``d*`` are
   candidates. Among the candidates inside the tolerance, let ``e*`` be the
   smallest relative error: the answer is the coarsest (most
   hardware-friendly) width whose error is at most ``e* + COARSE_SLACK``
   (0.1 percentage points of the budget), then the closer one. So raising
   the tolerance never trades a close match for a coarse width: only widths
   practically as close as the best one may win by being round.
   A layer-wise arm is only ever matched this way: its shape is the
   experiment.
2. **Uniform twins** start from the arm's mean (alpha, beta), i.e. the same
   model without layer-wise scaling, and are matched by width as in 1. Tiny
   models have coarse steps (every layer's FFN jumps by ``ffn_dim_divisor`` at
   once), so if no width lands within tolerance the twin's FFN width (then
   also its query width) is moved by whole multiples around the mean, and
   the feasible candidate closest to the mean multipliers wins (then the
   coarser width, then the smaller error).
3. ``twin: multipliers`` keeps the twin at the arm's width and solves only
   the uniform multipliers (FFN first, then query width too).

A target that no candidate meets within the tolerance raises ``BudgetError``
carrying the closest candidate.

``uniform_twin(model)`` is the twin of a layer-wise model at its own
parameter count, as a params-budget sweep solves it: the twin
``elmjax.bench`` compares against. Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

from elmjax.layout import layer_multipliers, param_counts
from elmjax.model_config import ModelConfig

AUTO_STEPS = (128, 64, 32, 16, 8, 4, 2, 1)
MAX_WIDTH = 1 << 17
_NEAREST = 24  # widths tried per step around d*
COARSE_SLACK = 0.001  # a coarser width may be this much (relative to the budget) further off than the closest one
DEFAULT_TOLERANCE = 0.01  # a grid's match.tolerance default

Measure = Callable[[ModelConfig], float]


@dataclass(frozen=True)
class Fit:
    model: ModelConfig
    achieved: float
    rel_error: float  # (achieved - target) / target


class BudgetError(ValueError):
    def __init__(self, reason: str, best: Fit | None = None):
        super().__init__(reason)
        self.reason = reason
        self.best = best


def _fit(model: ModelConfig, measure: Measure, target: float) -> Fit:
    achieved = measure(model)
    return Fit(model, achieved, (achieved - target) / target)


def _crossing(f: Callable[[int], float], target: float, min_width: int) -> int:
    """Smallest width >= min_width whose measure reaches ``target`` (f is non-decreasing)."""
    if f(min_width) >= target:
        return min_width
    lo, hi = min_width, 2 * min_width
    while f(hi) < target:
        lo, hi = hi, 2 * hi
        if hi > MAX_WIDTH:
            raise BudgetError(f"unreachable: even model_dim={MAX_WIDTH} gives only {f(MAX_WIDTH):.4g}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return hi


def _near(d_star: int, step: int, min_width: int, count: int) -> list[int]:
    """The ``count`` multiples of ``step`` (>= min_width) nearest ``d_star``."""
    base = max(d_star // step, 1)
    span = range(base - count // 2, base + count // 2 + 1)
    widths = sorted({k * step for k in span if k * step >= min_width}, key=lambda d: abs(d - d_star))
    return widths[:count]


def _coarseness(width: int, steps: Sequence[int]) -> int:
    return max((s for s in steps if width % s == 0), default=1)


def solve_width(shape: Callable[[int], ModelConfig], measure: Measure, target: float, tol: float,
                steps: Sequence[int] = AUTO_STEPS, min_width: int = 1) -> Fit:
    """The width (a multiple of one of ``steps``) whose ``shape(width)`` meets ``target`` within ``tol``."""
    d_star = _crossing(lambda d: measure(shape(d)), target, min_width)
    if d_star == min_width and measure(shape(min_width)) > target * (1 + tol):
        best = _fit(shape(min_width), measure, target)
        raise BudgetError(f"unreachable: the smallest model (model_dim={min_width}) already has {best.achieved:.4g}", best)
    widths = sorted({d for step in steps for d in _near(d_star, step, min_width, _NEAREST)})
    fits = [_fit(shape(d), measure, target) for d in widths]
    feasible = [f for f in fits if abs(f.rel_error) <= tol]
    if feasible:
        closest = min(abs(f.rel_error) for f in feasible)
        good = [f for f in feasible if abs(f.rel_error) <= closest + COARSE_SLACK]
        return min(good, key=lambda f: (-_coarseness(f.model.model_dim, steps), abs(f.rel_error)))
    best = min(fits, key=lambda f: abs(f.rel_error), default=None)
    near = [measure(shape(d)) for d in _near(d_star, min(steps), min_width, 2 * _NEAREST)]
    raise BudgetError(f"no width within {tol:.2%} of the target{_nearest_budgets(near, target, tol)}", best)


def _nearest_budgets(achieved: list[float], target: float, tol: float) -> str:
    """'; nearest budgets it can meet: 5.99e+06 or 6.011e+06' from the sizes widths near the target give."""
    # Width d meets any budget B with achieved/(1+tol) <= B <= achieved/(1-tol).
    below = [a / (1 - tol) for a in achieved if a / (1 - tol) < target]
    above = [a / (1 + tol) for a in achieved if a / (1 + tol) > target]
    options = ([f"<= {max(below):.5g}"] if below else []) + ([f">= {min(above):.5g}"] if above else [])
    return f"; nearest budgets it can meet: {' or '.join(options)}" if options else ""


def uniform_model(template: ModelConfig, width: int, alpha: float, beta: float) -> ModelConfig:
    """``template`` made uniform: scalar multipliers (schedules have no effect, so 'constant')."""
    return dataclasses.replace(template, model_dim=int(width), qkv_multipliers=float(alpha), ffn_multipliers=float(beta),
                               qkv_schedule="constant", ffn_schedule="constant")


def solve_twin(template: ModelConfig, alpha0: float, beta0: float, measure: Measure, target: float, tol: float, *,
               mode: str = "width", width: int | None = None, steps: Sequence[int] = AUTO_STEPS,
               min_width: int = 1) -> Fit:
    """The uniform twin for ``target``: see the module docstring for the search order."""
    best = None
    if mode == "width":
        try:
            return solve_width(lambda d: uniform_model(template, d, alpha0, beta0), measure, target, tol, steps, min_width)
        except BudgetError as e:
            best = e.best
        d_star = _crossing(lambda d: measure(uniform_model(template, d, alpha0, beta0)), target, min_width)
        widths = sorted({d for s in steps for d in _near(d_star, s, min_width, 8)})
        spans = (4, 3)
    elif mode == "multipliers":
        if width is None:
            raise ValueError("twin matching by multipliers needs the arm's width")
        widths, spans = [width], (None, None)
    else:
        raise ValueError(f"unknown twin matching mode {mode!r}")
    for vary_alpha in (False, True):
        fits = _twin_candidates(template, widths, alpha0, beta0, measure, target, vary_alpha, spans)
        feasible = [f for f in fits if abs(f.rel_error) <= tol]
        if feasible:
            return min(feasible, key=lambda f: (round(_deviation(f.model, alpha0, beta0), 9),
                                                -_coarseness(f.model.model_dim, steps), abs(f.rel_error)))
        for f in fits:
            if best is None or abs(f.rel_error) < abs(best.rel_error):
                best = f
    raise BudgetError(f"no uniform twin within {tol:.2%} of the target", best)


def _deviation(model: ModelConfig, alpha0: float, beta0: float) -> float:
    return abs(model.qkv_multipliers / alpha0 - 1) + abs(model.ffn_multipliers / beta0 - 1)


def _multiples(center: float, unit: int, span: int | None) -> list[int]:
    """Multiples of ``unit`` within ``span`` multiples of ``center`` (None: 1 up to 4x center)."""
    k = max(round(center / unit), 1)
    lo, hi = (k - span, k + span) if span is not None else (1, max(4 * k, 4))
    return [j * unit for j in range(max(lo, 1), hi + 1)]


def _twin_candidates(template: ModelConfig, widths, alpha0, beta0, measure, target, vary_alpha, spans) -> list[Fit]:
    fits = []
    q_unit = template.head_dim * template.num_gqa_groups
    for d in widths:
        q_widths = _multiples(alpha0 * d, q_unit, spans[1]) if vary_alpha else [None]
        for q in q_widths:
            alpha = alpha0 if q is None else _exact(q, d)
            for f in _multiples(beta0 * d, template.ffn_dim_divisor, spans[0]):
                fits.append(_fit(uniform_model(template, d, alpha, _exact(f, d)), measure, target))
    return fits


def _exact(width: int, d: int) -> float:
    """A short multiplier m with make_divisible(m * d) == width (width is a multiple of the divisor)."""
    for digits in (2, 3, 4, 6):
        m = round(width / d, digits)
        if abs(m * d - width) < 0.25:  # well inside the rounding half-step of any divisor >= 1
            return m
    return width / d


def mean_multipliers(model: ModelConfig) -> tuple[float, float]:
    """The model's mean (alpha, beta) over depth: its twin is the same model without layer-wise scaling."""
    alphas = layer_multipliers(model.qkv_multipliers, model.qkv_schedule, model.num_layers)
    betas = layer_multipliers(model.ffn_multipliers, model.ffn_schedule, model.num_layers)
    return round(sum(alphas) / len(alphas), 4), round(sum(betas) / len(betas), 4)


def total_params(model: ModelConfig) -> float:
    return float(param_counts(model).total)


def uniform_twin(model: ModelConfig, tol: float = DEFAULT_TOLERANCE, *, mode: str = "width",
                 steps: Sequence[int] = AUTO_STEPS) -> Fit:
    """The uniform twin of ``model`` at its own total parameter count: what a
    sweep with a params budget of that size trains next to it (same solver,
    same defaults: ``match: {tolerance: 0.01, twin: width, width_multiple: auto}``)."""
    alpha0, beta0 = mean_multipliers(model)
    return solve_twin(model, alpha0, beta0, total_params, total_params(model), tol, mode=mode,
                      width=model.model_dim, steps=steps, min_width=model.head_dim)
