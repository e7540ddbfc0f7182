"""Two local processes x 4 CPU devices (jax.distributed + gloo) train like one 8-device process."""

import os
import socket
import subprocess
import sys

import pytest

from elmjax import run_dir as rd
from elmjax.train import run
from train_helpers import tiny_config, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process_eight_devices(tmp_path):
    overrides = ("mesh.data=-1", "train.steps=6", "train.eval_every=3", "checkpoint.every=3")
    single = tmp_path / "single"
    run(tiny_config(single, *overrides))

    multi = tmp_path / "multi"
    cfg_path = write_config(tiny_config(multi, *overrides), tmp_path / "c.yaml")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            ELMJAX_COORDINATOR=f"127.0.0.1:{port}",
            ELMJAX_NUM_PROCESSES="2",
            ELMJAX_PROCESS_ID=str(pid),
        )
        log = open(tmp_path / f"proc{pid}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "elmjax.train", str(cfg_path)], env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], (tmp_path / "proc0.log").read_text()[-3000:] + (tmp_path / "proc1.log").read_text()[-3000:]
    a = [r for r in rd.read_metrics(single) if r["kind"] in ("train", "eval")]
    b = [r for r in rd.read_metrics(multi) if r["kind"] in ("train", "eval")]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        key = "loss" if x["kind"] == "train" else "val_loss"
        assert x["step"] == y["step"]
        assert y[key] == pytest.approx(x[key], rel=1e-5)
    assert rd.read_status(multi)["state"] == "done"


def _two_processes(cfg_path, tmp_path, tag=""):
    """`python -m elmjax.train` as 2 processes x 4 CPU devices; (processes, log files)."""
    port = _free_port()
    procs, logs = [], [tmp_path / f"proc{pid}{tag}.log" for pid in range(2)]
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   ELMJAX_COORDINATOR=f"127.0.0.1:{port}", ELMJAX_NUM_PROCESSES="2", ELMJAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-m", "elmjax.train", str(cfg_path)], env=env,
                                      stdout=open(logs[pid], "w"), stderr=subprocess.STDOUT))
    return procs, logs


def _wait_all(procs, logs, timeout=300):
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]


@pytest.mark.slow  # two runs of two processes: about 3 minutes on 2 busy cores
def test_damaged_latest_checkpoint_makes_every_process_fall_back_together(tmp_path):
    # Only process 0 checks the checksums; process 1 could read the flipped
    # step fine. Unless they agree, they would resume from different steps.
    d = tmp_path / "run"
    cfg_path = write_config(tiny_config(d, "mesh.data=-1", "train.steps=6", "checkpoint.every=3"), tmp_path / "c.yaml")
    _wait_all(*_two_processes(cfg_path, tmp_path))
    want = rd.read_final(d)
    (d / "final.json").unlink()  # killed after the final checkpoint ...
    rd.write_status(d, "running", total_steps=6)
    f = max((p for p in (d / "checkpoints" / "6" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40  # ... and a bit of that checkpoint flipped
    f.write_bytes(bytes(data))
    procs, logs = _two_processes(cfg_path, tmp_path, "-rerun")
    _wait_all(procs, logs)
    assert "checkpoint step 6" in logs[0].read_text() and "does not match its checksum" in logs[0].read_text()
    assert "checkpoint step 6" in logs[1].read_text() and "unreadable on another process" in logs[1].read_text()
    got = rd.read_final(d)
    assert got["val_loss"] == want["val_loss"] and got["train_loss"] == want["train_loss"]


@pytest.mark.slow  # two processes start and compile: about 80 s on 2 busy cores
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    # Each process sees its own signal; unless they agree on the step, the
    # signalled one enters the collective save while the other runs the
    # collective train step, and both hang.
    import signal
    import time

    d = tmp_path / "run"
    cfg = tiny_config(d, "mesh.data=-1", "train.steps=100000", "train.log_every=1", "checkpoint.every=100000")
    cfg_path = write_config(cfg, tmp_path / "c.yaml")
    procs, logs = _two_processes(cfg_path, tmp_path)
    try:
        deadline = time.time() + 300
        while not any(r.get("step", 0) >= 3 for r in rd.read_metrics(d)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # the non-lead process only
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [130, 130], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    status = rd.read_status(d)
    step = status["step"]
    assert status["state"] == "pending" and step >= 3
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [step]
    for log in logs:
        assert f"at step {step})" in log.read_text()
