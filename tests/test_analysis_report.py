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
    assert "tokens D are the same" in text and "lockstep" not in text  # L(N, D): constant tokens, said so
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
    assert "single seed: no interval" in text and "undetermined (1 pair)" in text
    assert "not enough seeds for an interval" in text

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
    summary = text[text.index("**Summary.**"):].split("\n\n")[0].splitlines()
    assert len(summary) == 3 and "uniform models only" in summary[0] and "nothing was compared" in summary[2]


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results.parquet, results.csv or run directories" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty"), "--chance", "no-equals-sign"])


def _set_column(sweep, col, value):
    import pandas as pd

    df = pd.read_parquet(sweep / "results.parquet")
    df[col] = value
    df.to_parquet(sweep / "results.parquet", index=False)
    df.to_csv(sweep / "results.csv", index=False)


def test_summary_flagged_fits_and_a_constant_accuracy_column(tmp_path, capsys):
    """One report of a 3-seed sweep whose eval accuracy is constant: a constant column used to stop the
    report with LinAlgError: Singular matrix; flagged fits used to print intervals like A up to 8.8e272."""
    sweep = write_sweep(tmp_path / "s", seeds=(0, 1, 2), eval_tasks=("toy",))
    _set_column(sweep, "eval.toy.acc", 0.5)
    assert main([str(sweep), "--n-boot", "40"]) == 0
    text = (sweep / "report" / "report.md").read_text()
    assert "### eval.toy.acc" in text
    assert "cannot fit: fit_accuracy_sigmoid: accuracy is the same (0.5) at every point" in text
    assert "cannot fit: fit_two_step_accuracy: accuracy is the same (0.5) at every point" in text

    head = text.split("\n## ")[0]
    summary = head[head.index("**Summary.**"):].split("\n\n")[0].splitlines()
    assert 3 <= len(summary) <= 5, summary
    assert "Compared: openelm against its uniform twin(s) at 3 params budget(s), 3 seed(s)" in summary[0]
    assert re.search(r"openelm minus its twin, val_loss per budget \[95% interval\]: 150,000: -?[\d.]+ \[", summary[1])
    assert "Strength of evidence (3 seed pair(s) per comparison): 3 of 3 arm/budget comparisons have an interval (t)" \
        in summary[2] and "tentative" in summary[2]
    # The power laws through 3 sizes are flagged (3 points, 3 parameters): estimates only, no interval numbers.
    scaling = text.split("## Scaling fits")[1].split("## ")[0]
    rows = [line for line in scaling.splitlines() if line.startswith("| openelm |") or line.startswith("| uniform |")]
    assert rows and all("(flagged: no interval)" in r and "[" not in r for r in rows), rows
    assert "only 3 distinct" in scaling  # the flag itself is printed


def test_arm_twin_pairs_of_different_sizes_are_flagged_in_the_report(tmp_path):
    import pandas as pd

    sweep = write_sweep(tmp_path / "s", budgets=(2.5e5,), seeds=(0, 1, 2), results=("parquet",))
    df = pd.read_parquet(sweep / "results.parquet")
    twin_params = df.set_index("run")["params"]
    arms = df.index[~df["is_uniform"]]
    df.loc[arms, "params"] = [twin_params[t] for t in df.loc[arms, "twin"]]  # matched exactly
    df.to_parquet(sweep / "results.parquet", index=False)
    text = (write_report(sweep, n_boot=20) / "report.md").read_text()
    assert "Size mismatch" not in text and "Caution" not in text
    arm = arms[0]
    df.loc[arm, "params"] = int(twin_params[df.loc[arm, "twin"]] * 1.044)
    df.to_parquet(sweep / "results.parquet", index=False)
    text = (write_report(sweep, n_boot=20) / "report.md").read_text()
    assert "**Size mismatch:** 1 arm/twin pair(s)" in text
    assert f"- {df.loc[arm, 'run']} (" in text and ": 4.4%" in text
    assert "Caution: " in text.split("\n## ")[0]  # named in the summary too


def test_chance_for_a_missing_column_and_a_torn_status_json_are_one_line_errors(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "s", budgets=(2.5e5,), seeds=(0,), results=())  # read from the run dirs
    assert main([str(sweep), "--n-boot", "20", "--chance", "eval.nope.acc=0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no column 'eval.nope.acc'" in err and "val_acc" in err
    assert not (sweep / "report").exists()
    status = next(sweep.glob("runs/*/status.json"))
    status.write_text('{"state": "do')  # torn by a kill mid-write (or a copy taken mid-write)
    assert main([str(sweep), "--n-boot", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(status) in err and "not valid JSON" in err, err
