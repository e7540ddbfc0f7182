"""CPU peak: measured once, cached on disk, used for MFU."""

import json

import pytest

from elmjax import hardware


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "_measure", lambda dtype: calls.append(dtype) or 2.5e11)
    assert hardware.peak_flops(dtype="float32") == 2.5e11
    assert hardware.peak_flops(dtype="float32") == 2.5e11
    assert calls == ["float32"]
    cache = json.loads((tmp_path / "elmjax" / "peak.json").read_text())
    assert list(cache.values()) == [2.5e11]
    # MFU against it; CPU devices share the machine, so no division by their count.
    assert hardware.mfu(1e6, 1e4, num_devices=8, dtype="float32") == pytest.approx(1e10 / 2.5e11)


def test_corrupt_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "elmjax").mkdir()
    (tmp_path / "elmjax" / "peak.json").write_text("{not json")
    monkeypatch.setattr(hardware, "_measure", lambda dtype: 1e11)
    assert hardware.measured_peak("float32") == 1e11


def test_measurement_is_a_plausible_matmul_rate():
    rate = hardware._measure("float32", sizes=(256,), repeats=2)
    assert 1e8 < rate < 1e14
