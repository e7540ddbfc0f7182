"""Preflight: memory, collectives and cost of the real train step, compiled from abstract inputs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from elmjax import config_io, preflight as pf
from elmjax.config import Config
from elmjax.hlo_stats import Collective, group_size, parse_collectives, shape_bytes, summarize, wire_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "elmjax/configs/tiny_cpu.yaml")
# Small enough to compile in a few seconds; big enough that FSDP has something to shard.
SMALL = ["model.num_layers=1", "data.seq_len=32", "data.batch_size=8"]
KEYS = {"devices", "mesh", "per_device", "collectives", "flops_per_step", "compile_s", "fits"}

HLO = """
HloModule jit_step, entry_computation_layout={()->f32[]}

%wrapped_reduce_scatter (p: f32[64,16]) -> f32[8,16] {
  %p = f32[64,16]{1,0} parameter(0)
  ROOT %reduce-scatter.1 = f32[8,16]{1,0} reduce-scatter(%p), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
}

ENTRY %main {
  %all-reduce.7 = (f32[], f32[128,64]{1,0}, /*index=2*/bf16[10]{0}) all-reduce(%a, %b, %c), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %all-gather-start = (f32[4,32]{1,0}, f32[32,32]{1,0}) all-gather-start(%d), channel_id=2, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}
  %all-gather-done = f32[32,32]{1,0} all-gather-done(%all-gather-start)
  %async-start = ((f32[64,16]{1,0}), f32[8,16]{1,0}, s32[]) async-start(%e), calls=%wrapped_reduce_scatter
  %async-done = f32[8,16]{1,0} async-done(%async-start)
  %collective-permute-start.2 = (bf16[2,8]{1,0}, bf16[2,8]{1,0}, u32[], u32[]) collective-permute-start(%f), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %collective-permute-done.2 = bf16[2,8]{1,0} collective-permute-done(%collective-permute-start.2)
  %all-to-all = s32[8,4]{1,0} all-to-all(%g), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %fusion.1 = f32[32,32]{1,0} fusion(%all-gather-done, %all-reduce.7), kind=kLoop, calls=%fused
  %gte = f32[] get-tuple-element(%all-reduce.7), index=0
  ROOT %r = f32[] add(%gte, %gte)
}
"""


def test_collectives_of_a_hand_made_hlo_snippet():
    cs = parse_collectives(HLO)
    s = summarize(cs)
    # async pairs count once, with the -done (output) shape; tuples sum; bf16 is 2 bytes
    ar = 4 + 128 * 64 * 4 + 10 * 2
    assert s["all-reduce"] == {"count": 1, "bytes": ar, "max_bytes": ar}
    assert s["all-gather"] == {"count": 1, "bytes": 32 * 32 * 4, "max_bytes": 32 * 32 * 4}
    assert s["reduce-scatter"] == {"count": 1, "bytes": 8 * 16 * 4, "max_bytes": 8 * 16 * 4}
    assert s["collective-permute"] == {"count": 1, "bytes": 2 * 8 * 2, "max_bytes": 2 * 8 * 2}
    assert s["all-to-all"] == {"count": 1, "bytes": 8 * 4 * 4, "max_bytes": 8 * 4 * 4}
    assert summarize(cs + cs)["all-to-all"] == {"count": 2, "bytes": 2 * 8 * 4 * 4, "max_bytes": 8 * 4 * 4}
    assert sorted(c.group_size for c in cs) == [2, 4, 8, 8, 8]
    ag = next(c for c in cs if c.kind == "all-gather")
    assert wire_bytes(ag) == pytest.approx(32 * 32 * 4 * 7 / 8)
    assert wire_bytes(Collective("reduce-scatter", 100, 4)) == 300
    assert wire_bytes(Collective("all-reduce", 100, 4)) == 150


def test_shape_and_group_parsing_edge_cases():
    assert shape_bytes("pred[]") == 1
    assert shape_bytes("(f32[2,3]{1,0}, token[], s8[5])") == 24 + 5
    assert group_size("replica_groups=[2,4]<=[4,2]T(1,0), dims") == 4
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}") == 8
    assert group_size("no groups here") == 1


def test_collectives_of_a_real_compiled_psum_and_all_gather():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("i",))
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("i")))

    def f(a):
        return jax.lax.psum(a, "i"), jax.lax.all_gather(a, "i", tiled=True)

    fn = jax.shard_map(f, mesh=mesh, in_specs=P("i"), out_specs=(P("i"), P("i")), check_vma=False)
    s = summarize(parse_collectives(jax.jit(fn).lower(x).compile().as_text()))
    assert s["all-reduce"]["count"] == 1 and s["all-reduce"]["bytes"] == 1 * 16 * 4
    assert s["all-gather"]["count"] == 1 and s["all-gather"]["bytes"] == 8 * 16 * 4
    assert s["reduce-scatter"]["count"] == s["collective-permute"]["count"] == 0


def _config(*overrides):
    return config_io.load(Config, TINY, [*SMALL, *overrides])


@pytest.fixture(scope="module")
def compiled():
    """The SMALL config's train step compiled for data=8 and for fsdp=8 (once for the module)."""
    out = {}
    for name, mesh in (("data", ["mesh.data=8"]), ("fsdp", ["mesh.data=1", "mesh.fsdp=8"])):
        cfg = _config(*mesh)
        out[name] = (cfg, pf.compile_step(cfg))
    return out


def test_fsdp_shards_parameters_and_optimizer_state(compiled):
    data = pf.report(*compiled["data"], "cpu", None)["per_device"]
    fsdp = pf.report(*compiled["fsdp"], "cpu", None)["per_device"]
    # every parameter has an embed dimension FSDP splits 8 ways (vocab 259 doesn't split over tensor=1 anyway)
    assert fsdp["params_bytes"] < data["params_bytes"] / 4
    assert fsdp["opt_state_bytes"] < data["opt_state_bytes"] / 4
    # data parallel replicates: the parameter shards are the whole float32 model
    cfg = compiled["data"][0]
    from elmjax.layout import param_counts

    assert data["params_bytes"] == 4 * param_counts(cfg.model).total


def test_report_has_the_keys_and_consistent_numbers(compiled):
    cfg, c = compiled["fsdp"]
    r = pf.report(cfg, c, "h100", None)
    assert KEYS <= set(r)
    assert set(r["per_device"]) >= {"params_bytes", "opt_state_bytes", "temp_bytes", "total_bytes"}
    assert r["devices"] == 8 and r["mesh"] == {"dcn_data": 1, "data": 1, "fsdp": 8, "tensor": 1}
    pd = r["per_device"]
    assert pd["total_bytes"] >= pd["temp_bytes"] + pd["params_bytes"] + pd["opt_state_bytes"] - 1024
    assert r["collectives"]["all-gather"]["count"] > 0  # FSDP gathers its parameters
    f = r["flops_per_step"]
    assert 0.8 < f["xla"] / f["analytic"] < 1.5  # XLA counts norms/softmax too, the analytic count matmuls only
    e = r["estimate"]
    assert e["step_s"] == max(e["compute_s"], e["memory_s"], e["comm_s"]) > 0
    # compiled by the CPU compiler for an H100 estimate: memory is the state-in-and-out lower bound
    assert e["memory_basis"] == "state"
    assert e["memory_s"] == pytest.approx((pd["argument_bytes"] + pd["output_bytes"]) / 3.35e12)
    assert e["compute_s"] == pytest.approx(f["xla_per_device"] / 67e12)  # float32 config: the fp32 peak
    assert 0 < e["mfu_ceiling"] <= 1
    json.dumps(r)  # JSON-ready
    assert pf.report(cfg, c, "cpu", None)["estimate"] is None  # no published CPU peak: no guess


def test_tiny_hbm_does_not_fit(compiled):
    cfg, c = compiled["data"]
    assert pf.report(cfg, c, "cpu", 0.0001)["fits"] is False
    assert pf.report(cfg, c, "h100", None)["fits"] is True


@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3"], "data.batch_size (8) must be divisible by mesh data*fsdp (3)"),
    (["mesh.data=16"], "only 8 devices"),
    (["mesh.bogus=1"], "bogus"),
])
def test_bad_config_or_mesh_is_a_one_line_error(overrides, message, capsys):
    assert pf.main([TINY, *SMALL, *overrides, "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_sets_fake_devices_before_jax_starts(tmp_path):
    """A fresh process with no XLA_FLAGS gets exactly --devices fake CPU devices."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-m", "elmjax.preflight", TINY, *SMALL, "mesh.data=1", "mesh.fsdp=4",
                          "--devices", "4", "--json", "--hbm-gib", "0.0001"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stderr  # 1: does not fit
    r = json.loads(out.stdout)
    assert KEYS <= set(r)
    assert r["devices"] == 4 and r["mesh"]["fsdp"] == 4 and r["fits"] is False


def test_sweep_preflight_compiles_each_shape_once_and_names_cells_that_do_not_fit(tmp_path, monkeypatch, capsys):
    from sweep_helpers import TINY_BASE, write_grid

    from sweeps import run as sweep_run

    model = {**TINY_BASE["model"], "model_dim": 64, "qkv_multipliers": 1.0, "ffn_multipliers": 2.0}
    base = {**TINY_BASE, "model": model, "data": {**TINY_BASE["data"], "batch_size": 8}, "mesh": {"data": -1}}
    grid = write_grid(tmp_path / "g.yaml", {"num_layers": [1, 2], "seed": [0, 1]}, base=base)
    compiles = []
    real = pf.compile_step
    monkeypatch.setattr(pf, "compile_step", lambda cfg: compiles.append(cfg) or real(cfg))
    for key in ("XLA_FLAGS", "JAX_PLATFORMS"):  # restored after the test: --devices rewrites them
        monkeypatch.setenv(key, os.environ.get(key, ""))
    rc = sweep_run.main([str(grid), "--preflight", "--devices", "8", "--hbm-gib", "0.0001"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    # 2 depths x 2 seeds = 4 runs, but only 2 distinct programs: seeds don't change what is compiled
    assert len(compiles) == 2
    assert "4 runs, 2 distinct shapes compiled" in out
    table = [line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(table) == 2 and all(" 2 " in line and "NO" in line and "1/8/1" not in line for line in table)
    errors = [line for line in err.splitlines() if line.startswith("error: shape")]
    assert len(errors) == 2
    assert all(e.count("-s0-") == 1 and e.count("-s1-") == 1 for e in errors)  # each names both runs of its shape
    assert all("bytes per device" in e and "more than 107,374" in e for e in errors)
    assert not (tmp_path / "runs").exists() and not Path("runs/g").exists()  # nothing written, nothing trained


@pytest.mark.slow
def test_device_check_runs_all_stages_on_cpu_with_tiny_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-m", "elmjax.device_check", "--model", TINY, "--batch", "4",
                          "--seq-len", "16", "--steps", "4", "--dtype", "float32", "--max-documents", "50",
                          "--bench", "--batch 2 --seq-len 8 --steps 1 --rounds 1", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.split("=== device check summary")[1]
    for stage in ("preflight", "bench", "train"):
        assert f"{stage:<9} exit 0" in summary
    # CPUs have no published peak; elmjax.hardware measures this machine's once, so MFU is a percentage.
    assert re.search(r"tokens/s over steps 3-4, MFU \d+(\.\d+)?%", summary), summary
    assert "per-device memory" in out.stdout and "ratio layer-wise / uniform" in out.stdout


def test_device_check_rejects_a_single_step(capsys):
    from elmjax import device_check

    assert device_check.main(["--steps", "1"]) == 2
    assert "--steps must be >= 2" in capsys.readouterr().err


def test_accelerator_names_and_detection():
    from elmjax import roofline

    assert set(pf.ACCELERATOR_NAMES) == set(roofline.ACCELERATORS) | {"cpu"}
    assert roofline.detect("NVIDIA H200") == "h200" and roofline.detect("TPU v5 lite") == "v5e"
    assert roofline.detect("cpu") == "cpu"
    for name in roofline.ACCELERATORS:  # every listed accelerator has both peaks from elmjax.hardware
        acc = roofline.accelerator(name)
        assert acc.peak("bfloat16") > acc.peak("float32") > 0


def test_fsdp_step_uses_less_memory_than_data_parallel_and_no_logits_sized_all_reduce(compiled):
    """Issue 9's check: with activations pinned, FSDP saves memory instead of
    costing it, and the [B, L, V] logits are never all-reduced."""
    data = pf.report(*compiled["data"], "cpu", None)
    fsdp = pf.report(*compiled["fsdp"], "cpu", None)
    assert fsdp["per_device"]["total_bytes"] < data["per_device"]["total_bytes"]
    cfg = compiled["fsdp"][0]
    logits_bytes = 4 * cfg.data.batch_size * cfg.data.seq_len * cfg.model.vocab_size
    assert fsdp["collectives"]["all-reduce"]["max_bytes"] < logits_bytes


def test_replicated_parameters_are_reported_with_their_bytes():
    # tensor=2 over a layer-wise model whose kv heads are 1 and 2 per layer: the odd layer stays replicated.
    cfg = _config("model.num_layers=2", "model.num_gqa_groups=4", "mesh.data=4", "mesh.tensor=2")
    r = pf.report(cfg, pf.compile_step(cfg), "cpu", None)
    rows = [x for x in r["replicated"] if x["axis"] == "kv_heads"]
    assert rows and all(x["size"] % 2 and x["extra_bytes"] > 0 for x in rows)
    assert "head_multiple=2" in pf.format_report(r)
    even = _config("model.num_layers=2", "model.num_gqa_groups=4", "model.head_multiple=2", "mesh.data=4", "mesh.tensor=2")
    assert not [x for x in pf.report(even, pf.compile_step(even), "cpu", None)["replicated"] if x["axis"] == "kv_heads"]


def test_chunked_loss_shows_a_smaller_step_for_a_large_vocabulary():
    """vocab 32000: the float32 logits of a device's 2 rows are 2 x 128 x 32000 x 4 = 33 MB.
    Computing the loss 32 positions at a time must save a good part of that."""
    big = ["model.vocab_size=32000", "data.seq_len=128", "data.batch_size=16", "mesh.data=8"]

    def temp(*extra):
        cfg = _config(*big, *extra)
        return pf.report(cfg, pf.compile_step(cfg), "cpu", None)["per_device"]["temp_bytes"]

    logits_per_device = 2 * 128 * 32000 * 4
    assert temp() - temp("execution.loss_chunk=32") > 0.4 * logits_per_device
