"""`python -m analysis.report`: complete on small and degenerate sweeps, atomic, honest about missing fits."""

import re

import pytest

from analysis.report import main, write_report
from analysis_fixtures import write_isoflop_sweep, write_sweep

SECTIONS = ("Overview", "Layer-wise arm vs uniform twin", "Effective parameter multiplier", "Ranking of arms",
            "Scaling fits", "IsoFLOP analysis", "Accuracy", "(alpha, beta) bounds", "Training curves")


def _figures(report_dir):
    return sorted(p.stem for p in (report_dir / "figures").glob("*.png"))


def test_small_sweep_with_failures(tmp_path, capsys):
    """3 budgets x 2 arms (+ twins) x 2 seeds, one failed and one diverged run."""
    sweep = write_sweep(tmp_path / "quick", arms=("openelm", "a0.25-1.0_b1.0-3.0"),
                        failed=(("openelm", 2.5e5, 1),), diverged=(("uniform", 4.0e5, 0),), eval_tasks=("toy",))
    assert main([str(sweep), "--n-boot", "60", "--chance", "eval.toy.acc=0.25"]) == 0
    out = capsys.readouterr().out
    report = sweep / "report"
    assert f"wrote {report / 'report.md'}" in out
    text = (report / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}" in text
    assert "RuntimeError: out of memory" in text and "diverged" in text  # left-out runs are listed
    assert "| openelm | 150,000 | 2 |" in text  # paired comparison row with both seeds
    assert "lockstep" in text  # L(N, D) is not identifiable here, and the report says why
    assert "chance (0.25)" in text
    figures = _figures(report)
    for name in ("diff_val_loss", "loss_vs_params", "loss_vs_compute", "training_curves", "allocation",
                 "acc_val_acc", "bounds_heatmap_0"):
        assert name in figures
    assert all((report / "figures" / f"{n}.pdf").stat().st_size > 0 for n in figures)
    # every figure the Markdown links exists
    for link in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (report / link).exists(), link
    assert not [p for p in sweep.iterdir() if p.name.startswith(".report")]  # no temporary directories left


def test_degenerate_sweeps_report_reasons_not_numbers(tmp_path):
    one = write_sweep(tmp_path / "one", budgets=(2.5e5,), seeds=(0,))
    text = (write_report(one, n_boot=30) / "report.md").read_text()
    assert "cannot fit" in text and "needs at least 4 usable points" in text
    assert "single seed: no interval" in text and "undetermined (1 seed)" in text

    dead = write_sweep(tmp_path / "dead", budgets=(1.5e5, 2.5e5), seeds=(0,),
                       failed=tuple((a, b, 0) for a in ("openelm", "uniform") for b in (1.5e5, 2.5e5)))
    text = (write_report(dead, n_boot=30) / "report.md").read_text()
    assert "usable (done, finite val_loss): 0" in text
    assert "No finished runs to rank." in text and "No finished uniform runs" in text


def test_rerun_replaces_the_report_and_isoflop_sweeps(tmp_path):
    sweep = write_isoflop_sweep(tmp_path / "iso")
    (sweep / "report").mkdir()
    (sweep / "report" / "stale.txt").write_text("from an older report")
    report = write_report(sweep, n_boot=40)
    assert not (report / "stale.txt").exists()
    text = (report / "report.md").read_text()
    assert "N_opt ~ C^a with a = " in text and "isoflop_uniform" in _figures(report)
    assert "Compute-optimal allocation" in text  # tokens vary at fixed size here, so L(N, D) is fitted
    assert "an isoFLOP grid" in text  # no single-variable fits across sizes at fixed FLOPs


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results.parquet, results.csv or run directories" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty"), "--chance", "no-equals-sign"])
