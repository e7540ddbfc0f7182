"""The CPU study's executed notebook: it reruns on the shipped data to the same summary the README reports."""


import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from test_analysis_notebook import NOTEBOOKS, REPO, kernel_of_this_python  # noqa: F401 - the kernel fixture

NOTEBOOK = NOTEBOOKS / "study_cpu.ipynb"
DATA = NOTEBOOKS / "study_cpu_data"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _summary_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and "SUMMARY =" in c.source)


@pytest.mark.parametrize("grid, data", [("study_cpu", DATA), ("mup_transfer", NOTEBOOKS / "mup_transfer_data")])
def test_the_snapshots_are_runs_of_the_shipped_grids(grid, data):
    shipped = yaml.safe_load((REPO / "sweeps" / "grids" / f"{grid}.yaml").read_text())
    ran = yaml.safe_load((data / "grid.yaml").read_text())
    assert ran == shipped  # comments aside: the headers record the measured times


def test_study_notebook_reruns_to_the_shipped_outputs_and_the_readme_table(kernel_of_this_python, monkeypatch):
    for var in ("ELMJAX_STUDY_DIR", "ELMJAX_STUDY_RERUN", "ELMJAX_N_BOOT"):
        monkeypatch.delenv(var, raising=False)
    shipped = nbformat.read(NOTEBOOK, as_version=4)
    shipped_summary = _text(_summary_cell(shipped))
    assert "| openelm |" in shipped_summary, "the shipped notebook must be executed (outputs saved)"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=kernel_of_this_python, timeout=600,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Same data, same bootstrap seeds: the same numbers as the shipped outputs.
    assert _text(_summary_cell(nb)) == shipped_summary
    readme = (REPO / "README.md").read_text()
    missing = [line for line in shipped_summary.splitlines() if line.startswith("| ") and line not in readme]
    assert not missing, f"README's study table differs from the notebook: {missing[:3]}"
    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "reproduced exactly" in text and "NOT reproduced" not in text
    assert "split problems: none" in text
    mup = _text(next(c for c in nb.cells if c.cell_type == "code" and "MUP_SUMMARY =" in c.source))
    assert [line for line in mup.splitlines() if line.startswith("| ") and line not in readme] == []
