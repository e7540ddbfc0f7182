"""elmjax.programs: programs compiled ahead on the background thread are taken, waited for, or replaced on failure."""

import threading
import time
from collections import OrderedDict

import jax
import numpy as np
import pytest

from compile_log import backend_compiles
from elmjax import programs
from elmjax.sharding import make_mesh
from elmjax.state import state_layout
from train_helpers import tiny_config


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts with no kept programs and zeroed counters (the registry is process-wide)."""
    monkeypatch.setattr(programs, "_compiled", OrderedDict())
    monkeypatch.setattr(programs, "_in_use", None)
    monkeypatch.setattr(programs, "stats", programs.AheadStats())


# The programs compiled per model; its init state is assembled on the host (elmjax.host_state), with no program.
PROGRAMS = {"jit(train_step)", "jit(eval_step)"}


def config(tmp_path, *overrides):
    return tiny_config(tmp_path / "run", "train.steps=3", *overrides)


def ahead_job(cfg, mesh):
    return programs._compiled[programs.program_key(cfg, mesh)].job


def test_programs_compiled_ahead_are_taken_without_compiling_again(tmp_path):
    cfg = config(tmp_path)
    mesh = make_mesh(cfg.mesh)
    with backend_compiles() as ahead:
        assert programs.compile_ahead(cfg, mesh)
        assert not programs.compile_ahead(cfg, mesh)  # in flight or kept: not queued twice
        ahead_job(cfg, mesh).result(timeout=600)
    assert sorted(PROGRAMS.intersection(ahead)) == sorted(PROGRAMS)  # it did compile them, on the worker
    assert programs.stats.compiled == 1 and programs.stats.seconds > 0
    with backend_compiles() as taken:
        got = programs.compiled_programs(cfg, mesh, state_layout(cfg, mesh))
    assert PROGRAMS.intersection(taken) == set()
    # The same executables, and they work: another seed through the shared init program.
    state = got.init_state(3)
    assert int(state.step) == 0


def _slow_fake_compile(monkeypatch, release: threading.Event, fail_on_worker=False):
    """Replace the XLA compile with a fake that records its calls and waits for ``release``."""
    calls = []

    def fake(config, mesh, layout):
        calls.append(threading.current_thread().name)
        release.wait(timeout=60)
        if fail_on_worker and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("boom in the background")
        return object()

    monkeypatch.setattr(programs, "_compile", fake)
    return calls


def test_a_run_whose_programs_are_in_flight_waits_for_them_instead_of_compiling(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    mesh = make_mesh(cfg.mesh)
    release = threading.Event()
    calls = _slow_fake_compile(monkeypatch, release)
    programs.compile_ahead(cfg, mesh)
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("p", programs.compiled_programs(cfg, mesh, None)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "the run did not wait for the compile in flight"
    release.set()
    waiter.join(timeout=60)
    assert len(calls) == 1 and calls[0].startswith("elmjax-compile-ahead")
    assert got["p"] is programs._compiled[programs.program_key(cfg, mesh)].future.result()


def test_a_failed_ahead_compile_is_replaced_by_the_runs_own_compile(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    mesh = make_mesh(cfg.mesh)
    release = threading.Event()
    calls = _slow_fake_compile(monkeypatch, release, fail_on_worker=True)
    programs.compile_ahead(cfg, mesh)
    threading.Timer(0.3, release.set).start()  # fails while the run already waits for it
    got = programs.compiled_programs(cfg, mesh, None)
    assert got is not None and len(calls) == 2 and calls[1] == threading.main_thread().name
    assert programs.stats.failed == 1 and programs.stats.compiled == 0
    assert programs.compiled_programs(cfg, mesh, None) is got  # kept like any other


def test_the_runs_own_compile_error_is_raised(tmp_path, monkeypatch):
    def broken(config, mesh, layout):
        raise ValueError("does not fit")

    monkeypatch.setattr(programs, "_compile", broken)
    cfg = config(tmp_path)
    with pytest.raises(ValueError, match="does not fit"):
        programs.compiled_programs(cfg, make_mesh(cfg.mesh), None)
    assert programs._compiled == {}  # forgotten: the next run of those shapes tries again


def test_eviction_spares_programs_in_use_in_flight_or_compiled_ahead_and_not_yet_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "KEEP", 1)
    mesh = make_mesh(config(tmp_path).mesh)
    cfgs = [config(tmp_path, f"train.steps={3 + i}") for i in range(4)]  # total steps are part of the key
    key = [programs.program_key(c, mesh) for c in cfgs]
    release = threading.Event()
    calls = _slow_fake_compile(monkeypatch, release)
    release.set()
    programs.compiled_programs(cfgs[0], mesh, None)
    release.clear()
    programs.compile_ahead(cfgs[1], mesh)  # blocked in flight
    time.sleep(0.1)
    release_later = threading.Timer(0.3, release.set)
    release_later.start()
    programs.compiled_programs(cfgs[2], mesh, None)  # main thread: compiled once released
    ahead_job(cfgs[1], mesh).result(timeout=60)
    # 0 (no longer in use) went; 2 is in use; 1 was compiled ahead and no run has taken it yet.
    assert set(programs._compiled) == {key[1], key[2]}
    n = len(calls)
    programs.compiled_programs(cfgs[1], mesh, None)
    assert len(calls) == n  # taken, not recompiled
    programs.compiled_programs(cfgs[3], mesh, None)
    assert list(programs._compiled) == [key[3]]


@pytest.mark.parametrize("arm", ["openelm", "uniform"])
def test_the_cpu_init_program_gives_the_bits_of_the_default_compile(tmp_path, arm):
    """CPU_INIT_OPTIONS compile the init program faster; the parameters (every bit, several seeds) must not change."""
    overrides = ("model.ffn_multipliers=[0.5,4.0]", "model.qkv_multipliers=[0.5,1.0]") if arm == "openelm" else \
        ("model.ffn_multipliers=[2.0,2.0]", "model.qkv_multipliers=[1.0,1.0]")
    cfg = config(tmp_path, *overrides)
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    fast = programs._compile_create(mesh, layout)
    default = programs._compile_create(mesh, layout, options={})
    for seed in (0, 1, 2**31 - 1):
        got, want = (jax.tree.leaves(jax.device_get(p(np.int32(seed)))) for p in (fast, default))
        assert len(got) == len(want) > 10
        for a, b in zip(got, want):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
