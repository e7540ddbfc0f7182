"""The budget solver: accuracy over many random arms, honest infeasibility, twins, FLOP budgets."""

import math
import random
import re

import pytest

from elmjax.layout import param_counts, train_flops_per_token
from elmjax.model_config import PRESETS, SCHEDULES, ModelConfig
from sweeps.arms import Arm, apply_arm, is_uniform, mean_multipliers
from sweeps.budget import AUTO_STEPS, COARSE_SLACK, BudgetError, make_measure, solve_twin, solve_width
from sweeps.tokens import TokenSpec, trained_tokens

TOL = 0.01


def random_case(rng: random.Random):
    hd = rng.choice([16, 32, 64])
    model = ModelConfig(num_layers=rng.randint(2, 16), head_dim=hd, num_gqa_groups=rng.choice([1, 2, 4]),
                        ffn_dim_divisor=rng.choice([8, 16, 64, 256]), vocab_size=rng.choice([259, 32000]))
    a_lo = round(rng.uniform(0.2, 1.0), 2)
    b_lo = round(rng.uniform(0.25, 3.0), 2)
    arm = Arm("r", (a_lo, round(a_lo + rng.uniform(0, 1.0), 2)), (b_lo, round(b_lo + rng.uniform(0, 3.0), 2)),
              rng.choice(SCHEDULES), rng.choice(SCHEDULES))
    kind = rng.choice(["params", "non_embedding_params", "flops"])
    measure = make_measure(kind, 256, 256 * 8, 10_000_000)
    # Budgets between a small model (d = 4 * head_dim) and a large one (d = 8192).
    lo, hi = (measure(apply_arm(arm, model, d)) for d in (4 * hd, 8192))
    target = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return model, arm, measure, target


def brute_force_best(shape, measure, target):
    """Smallest |relative error| over every integer width that could possibly be within tolerance."""
    best = math.inf
    d = 1
    while True:
        err = measure(shape(d)) / target - 1
        best = min(best, abs(err))
        if err > TOL:  # the measure only grows with width: nothing further can be closer
            return best
        d = d + 1 if err > -0.2 else d * 2 if err < -0.9 else d + max(1, d // 50)


def test_solver_hits_the_budget_or_proves_it_cannot_over_many_random_arms():
    rng = random.Random(1234)
    solved = 0
    for _ in range(120):
        model, arm, measure, target = random_case(rng)
        shape = lambda d: apply_arm(arm, model, d)  # noqa: E731
        try:
            fit = solve_width(shape, measure, target, TOL, AUTO_STEPS, model.head_dim)
        except BudgetError as e:
            # Infeasible must be true: no width in the region that matters gets within tolerance.
            assert brute_force_best(shape, measure, target) > TOL, f"solver missed a width: {arm} {target}"
            assert e.best is not None and abs(e.best.rel_error) > TOL
            continue
        solved += 1
        assert abs(fit.rel_error) <= TOL
        assert fit.achieved == measure(fit.model)  # what is reported is what the layout gives
        assert fit.model == apply_arm(arm, model, fit.model.model_dim)  # only the width changed
    assert solved >= 80  # most random budgets are reachable within 1%


def test_twins_are_uniform_same_size_and_start_from_the_arm_mean():
    rng = random.Random(99)
    checked = exact_mean = 0
    for _ in range(60):
        model, arm, measure, target = random_case(rng)
        try:
            fit = solve_width(lambda d: apply_arm(arm, model, d), measure, target, TOL, AUTO_STEPS, model.head_dim)
        except BudgetError:
            continue
        if is_uniform(fit.model):
            continue
        alpha, beta = mean_multipliers(fit.model)
        try:
            twin = solve_twin(model, alpha, beta, measure, target, TOL, min_width=model.head_dim)
        except BudgetError as e:
            assert abs(e.best.rel_error) > TOL
            continue
        checked += 1
        assert is_uniform(twin.model) and abs(twin.rel_error) <= TOL
        assert twin.achieved == measure(twin.model)
        assert (twin.model.num_layers, twin.model.head_dim) == (model.num_layers, model.head_dim)
        exact_mean += (twin.model.qkv_multipliers, twin.model.ffn_multipliers) == (alpha, beta)
    assert checked >= 30
    assert exact_mean >= checked * 0.7  # multipliers move only when no width alone fits


def test_twin_matched_by_multipliers_keeps_the_arm_width():
    model = ModelConfig(num_layers=8, head_dim=32, num_gqa_groups=2, ffn_dim_divisor=32)
    arm = Arm("openelm", (0.5, 1.0), (0.5, 4.0), "linear", "linear")
    measure = make_measure("params", 128, 1024, 1000)
    fit = solve_width(lambda d: apply_arm(arm, model, d), measure, 3e6, TOL)
    alpha, beta = mean_multipliers(fit.model)
    twin = solve_twin(model, alpha, beta, measure, 3e6, TOL, mode="multipliers", width=fit.model.model_dim)
    assert twin.model.model_dim == fit.model.model_dim
    assert is_uniform(twin.model) and abs(twin.rel_error) <= TOL


@pytest.mark.parametrize("name", list(PRESETS))
def test_openelm_presets_are_recovered_exactly_from_their_budgets(name):
    preset = PRESETS[name]
    arm = Arm("openelm", (0.5, 1.0), (0.5, 4.0), "linear", "linear")
    target = param_counts(preset).total
    fit = solve_width(lambda d: apply_arm(arm, preset, d), make_measure("params", 2048, 2048, 1), target, TOL, (128,))
    assert fit.model.model_dim == preset.model_dim and fit.rel_error == 0.0


def test_flops_budget_with_tokens_per_parameter_sizes_the_model():
    model = ModelConfig(num_layers=6, head_dim=32, num_gqa_groups=2, ffn_dim_divisor=32)
    arm = Arm("openelm", (0.5, 1.0), (0.5, 4.0), "linear", "linear")
    spec = TokenSpec("per_param", 20.0)
    measure = make_measure("flops", 128, 128 * 16, spec)
    fit = solve_width(lambda d: apply_arm(arm, model, d), measure, 1e15, TOL)
    n = param_counts(fit.model).total
    tokens = trained_tokens(math.ceil(20 * n), 128 * 16)
    assert fit.achieved == train_flops_per_token(fit.model, 128) * tokens
    assert abs(fit.achieved / 1e15 - 1) <= TOL


def test_unreachable_budgets_raise_with_the_closest_candidate():
    model = ModelConfig(num_layers=4, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16)
    arm = Arm("openelm", (0.5, 1.0), (0.5, 4.0), "linear", "linear")
    measure = make_measure("params", 64, 512, 1)
    with pytest.raises(BudgetError, match="smallest model"):
        solve_width(lambda d: apply_arm(arm, model, d), measure, 100, TOL, min_width=16)
    with pytest.raises(BudgetError, match="no width within") as e:
        solve_width(lambda d: apply_arm(arm, model, d), measure, 2e5, TOL, min_width=16)
    assert e.value.best.model.model_dim == 70 and abs(e.value.best.rel_error) > TOL
    # The budgets the error suggests are met.
    below, above = map(float, re.search(r"can meet: <= (\S+) or >= (\S+)", str(e.value)).groups())
    assert below < 2e5 < above
    for budget in (below * 0.9999, above * 1.0001):
        fit = solve_width(lambda d: apply_arm(arm, model, d), measure, budget, TOL, min_width=16)
        assert abs(fit.rel_error) <= TOL


def test_raising_the_tolerance_never_trades_a_close_width_for_a_coarse_one():
    """The quickstart's openelm arm at 250k: with a 5% tolerance the solver used to take width 76 (-2.79%),
    the first step-4 multiple inside the tolerance, over 77 (-0.03%)."""
    from sweeps.arms import parse_arm

    model = ModelConfig(num_layers=4, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, vocab_size=259)
    shape = lambda d: apply_arm(parse_arm("openelm", "openelm"), model, d)  # noqa: E731
    measure = make_measure("params", 64, 64 * 8, 1)
    for tol in (0.01, 0.05, 0.2):
        fit = solve_width(shape, measure, 2.5e5, tol, AUTO_STEPS, model.head_dim)
        assert fit.model.model_dim == 77 and fit.rel_error == pytest.approx(-0.0003, abs=1e-4), tol


def test_a_coarse_width_wins_only_when_it_is_practically_as_close_as_the_best():
    shape = lambda d: ModelConfig(num_layers=1, model_dim=d, head_dim=16)  # noqa: E731
    width = lambda m: float(m.model_dim)  # noqa: E731
    # 1280 (a multiple of 128) is 0.04% off, 1281 0.04% off the other way: the round width wins.
    assert solve_width(shape, width, 1280.5, 0.05, AUTO_STEPS).model.model_dim == 1280
    # 1290 is exact and 1280 0.78% off: the exact width wins, whatever the tolerance.
    for tol in (0.01, 0.05):
        assert solve_width(shape, width, 1290, tol, AUTO_STEPS).model.model_dim == 1290
    # Within COARSE_SLACK of the best, the coarsest width wins (1280 at -0.08% over 1281 at 0%).
    assert COARSE_SLACK == 0.001
    assert solve_width(shape, width, 1281, 0.05, AUTO_STEPS).model.model_dim == 1280
    assert solve_width(shape, width, 1282, 0.05, AUTO_STEPS).model.model_dim == 1282  # 1280 is 0.16% off


def test_the_solver_is_as_close_as_any_width_up_to_the_slack_over_many_random_arms():
    rng = random.Random(99)
    for _ in range(60):
        model, arm, measure, target = random_case(rng)
        shape = lambda d: apply_arm(arm, model, d)  # noqa: E731
        for tol in (TOL, 0.05):
            try:
                fit = solve_width(shape, measure, target, tol, AUTO_STEPS, model.head_dim)
            except BudgetError:
                continue
            assert abs(fit.rel_error) <= brute_force_best(shape, measure, target) + COARSE_SLACK + 1e-12
