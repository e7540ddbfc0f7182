"""Power analysis: the stated minimal detectable effect and seeds-needed agree with simulated sweeps."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.power import (min_detectable_effect, power, power_table, seeds_column, seeds_needed,
                            simulate_detection_rate)
from analysis.report import write_report
from analysis_fixtures import write_sweep


@pytest.mark.parametrize("n,sd", [(3, 0.02), (6, 0.05), (12, 0.01)])
def test_min_detectable_effect_is_detected_80_percent_of_the_time(n, sd):
    mde = min_detectable_effect(sd, n)
    assert power(mde, sd, n) == pytest.approx(0.8, abs=1e-6)
    # 8000 simulated sweeps: binomial sd of the rate is 0.0045, so 0.02 is > 4 sd.
    assert simulate_detection_rate(mde, sd, n, sweeps=8000, seed=n) == pytest.approx(0.8, abs=0.02)
    # a difference half as large is clearly under-powered, one twice as large almost always found
    assert simulate_detection_rate(mde / 2, sd, n, sweeps=4000, seed=1) < 0.6
    assert simulate_detection_rate(2 * mde, sd, n, sweeps=4000, seed=2) > 0.97


def test_mde_scales_like_one_over_root_n_for_many_seeds():
    # large-n limit: (z_{0.975} + z_{0.8}) * sd / sqrt(n) = 2.8016 sd / sqrt(n)
    assert min_detectable_effect(1.0, 400) == pytest.approx(2.8016 / 20, rel=0.01)
    assert math.isnan(min_detectable_effect(0.1, 1)) and math.isnan(min_detectable_effect(float("nan"), 5))


@pytest.mark.parametrize("delta,sd", [(0.01, 0.02), (0.03, 0.02), (0.005, 0.02)])
def test_seeds_needed_matches_simulation(delta, sd):
    n = seeds_needed(delta, sd)
    assert n >= 2
    # exact: n reaches 80% and n - 1 does not
    assert power(delta, sd, n) >= 0.8 and (n == 2 or power(delta, sd, n - 1) < 0.8)
    sim = simulate_detection_rate(delta, sd, n, sweeps=8000, seed=3)
    assert sim >= 0.78
    if n > 3:
        assert simulate_detection_rate(delta, sd, n - 2, sweeps=8000, seed=4) < 0.8
    assert math.isnan(seeds_needed(0.0, sd)) and math.isnan(seeds_needed(delta, 0.0))


def test_power_table_uses_each_rows_seed_spread_and_twin_mean():
    """Rows of paired_differences with sd 0.03 and 0.06 of a twin loss of 3.0."""
    d = pd.DataFrame({"arm": ["a", "b", "c"], "budget": [1.0, 1.0, 1.0], "n_pairs": [6, 6, 1],
                      "verdict": ["no clear difference"] * 3, "seed_sd": [0.03, 0.06, float("nan")],
                      "twin_mean": [3.0, 3.0, 3.0]})
    t = power_table(d)
    assert t["mde"].iloc[0] == pytest.approx(min_detectable_effect(0.03, 6))
    assert t["mde"].iloc[1] == pytest.approx(2 * t["mde"].iloc[0])  # linear in sd at fixed n
    assert t["mde_rel"].iloc[0] == pytest.approx(t["mde"].iloc[0] / 3.0)
    # Effect sizes 1 and 0.5 sd: the textbook (G*Power) paired-t sample sizes are 10 and 34 pairs.
    assert t[seeds_column(0.01)].iloc[0] == 10
    assert t[seeds_column(0.005)].iloc[0] == 34
    assert math.isnan(t["mde"].iloc[2]) and math.isnan(t[seeds_column(0.02)].iloc[2])


def test_report_states_what_a_no_clear_difference_could_have_seen(tmp_path):
    # openelm's true advantage (mult 1.05 for "middle") is tiny against noise 0.02: no clear difference
    sweep = write_sweep(tmp_path / "s", arms=("middle",), seeds=(0, 1, 2, 3), noise=0.02, budgets=(1.5e5, 4.0e5))
    text = (write_report(sweep, n_boot=50) / "report.md").read_text()
    assert "## Power: what this sweep could detect" in text
    assert "seeds for 1.0%" in text
    no_clear = [line for line in text.splitlines() if "no clear difference" in line and line.startswith("| middle")]
    assert no_clear, "the noisy sweep should have a no-clear-difference row"
    assert all("we could have seen differences larger than" in line for line in no_clear)
    summary = text.split("## ")[0]
    assert "we could have seen differences larger than" in summary
    assert "Sensitivity (80% power, alpha 0.05" in summary and "(detecting 1% would take up to" in summary
    # two budgets x 4 seeds: the pooled table counts 8 pairs, and detects less than either budget alone
    power = text.split("## Power: what this sweep could detect")[1].split("\n## ")[0]
    pooled = [line for line in power.split("Pooled over budgets")[1].splitlines() if line.startswith("| middle")]
    assert len(pooled) == 1 and pooled[0].startswith("| middle | 2 | 8 |")
    per_budget = [line for line in power.split("Pooled over budgets")[0].splitlines() if line.startswith("| middle")]
    rel = lambda line, i: float(line.split("|")[i].strip().rstrip("%"))  # noqa: E731
    assert all(rel(pooled[0], 5) < rel(line, 6) for line in per_budget)
