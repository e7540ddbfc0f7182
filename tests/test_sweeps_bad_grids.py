"""Every malformed grid in tests/bad_grids/ is one clear error and writes nothing.

Each file starts with '# expect: <YAML path> | <reason>'; the error must name
the file, that path and that reason, the command must exit with status 2,
and neither the sweep directory nor anything else may appear on disk.
"""

from pathlib import Path

import pytest

from sweeps import run

BAD = sorted((Path(__file__).parent / "bad_grids").glob("*.yaml"))


def expectation(path: Path) -> tuple[str, str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path} lacks its '# expect:' line"
    where, _, reason = first.removeprefix("# expect: ").partition(" | ")
    return where.strip(), reason.strip()


def test_there_are_enough_bad_grids():
    assert len(BAD) >= 15


@pytest.mark.parametrize("grid", BAD, ids=[p.stem for p in BAD])
def test_bad_grid_is_a_clear_error_and_nothing_is_written(grid, tmp_path, monkeypatch, capsys):
    where, reason = expectation(grid)
    monkeypatch.chdir(tmp_path)  # the default output (runs/<name>) would land here
    out = tmp_path / "sweep"
    assert run.main([str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(grid) in err
    assert f"{where}:" in err, f"the error does not name the YAML path {where!r}:\n{err}"
    assert reason in err, f"the error does not give the reason {reason!r}:\n{err}"
    assert list(tmp_path.iterdir()) == [], "a rejected grid must not write anything"
    # Without --out, too: nothing under the default runs/<grid name>/.
    assert run.main([str(grid)]) == 2
    assert list(tmp_path.iterdir()) == []
