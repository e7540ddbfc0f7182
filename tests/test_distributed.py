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
