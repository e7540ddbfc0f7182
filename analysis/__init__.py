"""Analysis of elmjax sweeps: loading, scaling-law fits with bootstrap intervals,
matched-budget comparisons of allocation arms, figures and reports.

Reads run and sweep directories only; never imports JAX. Names are imported
lazily so ``import analysis`` stays cheap (no seaborn until a plot is made)::

    from analysis import load_sweep, fit_chinchilla, paired_differences, write_report
"""

import importlib

_LAZY = {
    "load_sweep": "analysis.load",
    "load_curves": "analysis.load",
    "finished": "analysis.load",
    "SweepError": "analysis.load",
    "fit_power_law": "analysis.fits",
    "fit_chinchilla": "analysis.fits",
    "PowerLawFit": "analysis.fits",
    "ChinchillaFit": "analysis.fits",
    "FitWarning": "analysis.fits",
    "InsufficientDataError": "analysis.fits",
    "fit_isoflop": "analysis.isoflop",
    "IsoFlopFit": "analysis.isoflop",
    "fit_accuracy_sigmoid": "analysis.accuracy",
    "fit_two_step_accuracy": "analysis.accuracy",
    "SigmoidFit": "analysis.accuracy",
    "TwoStepFit": "analysis.accuracy",
    "Interval": "analysis.bootstrap",
    "paired_differences": "analysis.compare",
    "effective_multiplier": "analysis.compare",
    "rank_arms": "analysis.compare",
    "pairs": "analysis.compare",
    "write_report": "analysis.report",
    "min_detectable_effect": "analysis.power",
    "seeds_needed": "analysis.power",
    "power_table": "analysis.power",
    "final_metric": "analysis.splits",
    "split_problems": "analysis.splits",
    "optimum_table": "analysis.tuning",
    "shared_value_differences": "analysis.tuning",
    "tuning_curves": "analysis.tuning",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
