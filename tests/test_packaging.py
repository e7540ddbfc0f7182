"""pyproject.toml: SPDX license with a setuptools that understands it, the documented extras, shipped data."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_and_the_build_backend_supports_it():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"  # the table form warns with current pip/setuptools
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    version = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", req).group(1).split("."))
    assert version >= (77,), f"setuptools {req}: PEP 639 license strings need setuptools >= 77"


def test_notebook_and_tensorboard_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("jupyterlab") for d in extras["notebook"])
    assert any(d.startswith("tensorboard") for d in extras["tb"])


def test_shipped_data_files_are_package_data():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package, patterns in data.items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"{package}/{pattern} matches nothing"
    assert "tasks/*.jsonl" in data["sweeps"] and "notebooks/*.ipynb" in data["analysis"]
