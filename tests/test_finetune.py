"""python -m elmjax.finetune: run-directory contract, adapters out, exact resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from elmjax import config_io, run_dir as rd
from elmjax.checkpoint import load_model
from elmjax.finetune import run as finetune
from elmjax.finetune_config import FinetuneConfig
from elmjax.peft_io import load_adapters
from elmjax.train import run as train
from train_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TASK = str(ROOT / "sweeps" / "tasks" / "block_colon.jsonl")
FT = ["train.steps=8", "train.log_every=2", "train.eval_every=4", "checkpoint.every=3", "train.progress=false",
      "data.seq_len=32", "data.batch_size=4", "data.val_sequences=8", "peft.rank=2", "peft.method=dora",
      "peft.targets=[qkv,ffn_out]", "peft.layers=[1]", "mesh.data=1", "compilation_cache=''"]


def ft_config(base, run_dir, *overrides):
    return config_io.load(FinetuneConfig, None, [*FT, *overrides], data={"init_from": str(base), "run_dir": str(run_dir)})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config(d, "train.steps=5"))
    return d


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft") / "run"
    return finetune(ft_config(base, d, f"eval.tasks=[{TASK}]")), d


def test_finetune_writes_the_run_directory_contract(base, reference):
    result, d = reference
    assert result.state == "done" and rd.read_status(d)["state"] == "done"
    f = rd.read_final(d)
    assert f["step"] == 8 and f["peft_method"] == "dora"
    # DoRA on qkv and ffn_out of layer 1: A, B and m of two weights.
    adapters, cfg = load_adapters(d / "adapter", load_model(base).cfg)
    assert cfg.method == "dora" and cfg.layers == (1,) and cfg.targets == ("qkv", "ffn_out")
    assert f["adapter_params"] == sum(x.size for x in jax.tree.leaves(adapters)) < f["params"] / 5
    assert set(f["eval_before"]) == set(f["eval_after"]) == {"eval.block_colon.acc", "eval.block_colon.acc_norm"}
    rows = rd.read_metrics(d)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 8]
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    # Optimizer defaults are fine-tuning's, not pretraining's.
    assert max(r["lr"] for r in rows if r["kind"] == "train") <= 2e-4


_KILL_AT = """
import os, signal, sys
from elmjax import config_io
from elmjax.finetune import run
from elmjax.finetune_config import FinetuneConfig

def kill(step, total, row):
    if step == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

cfg = config_io.load(FinetuneConfig, None, sys.argv[4:], data={"init_from": sys.argv[1], "run_dir": sys.argv[2]})
run(cfg, progress_callback=kill)
"""


def test_sigkill_then_resume_is_bit_identical(base, reference, tmp_path):
    _, ref = reference
    d = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", _KILL_AT, str(base), str(d), "4", *FT, f"eval.tasks=[{TASK}]"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert rd.read_status(d)["state"] == "running"
    finetune(ft_config(base, d, f"eval.tasks=[{TASK}]"))
    keys = ("step", "loss", "grad_norm", "lr", "batch_fingerprint")
    got = [{k: r[k] for k in keys} for r in rd.read_metrics(d) if r["kind"] == "train"]
    want = [{k: r[k] for k in keys} for r in rd.read_metrics(ref) if r["kind"] == "train"]
    assert got == want
    a = (d / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (ref / "adapter" / "adapter_model.safetensors").read_bytes()
    f, g = rd.read_final(d), rd.read_final(ref)
    assert {k: f[k] for k in ("val_loss", "eval_after")} == {k: g[k] for k in ("val_loss", "eval_after")}


def test_missing_init_from_is_a_config_error(tmp_path):
    from elmjax.config_io import ConfigError

    with pytest.raises(ConfigError, match="init_from"):
        config_io.load(FinetuneConfig, None, [], data={"run_dir": str(tmp_path)})
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"init_from: {tmp_path / 'nowhere'}\nrun_dir: {tmp_path / 'r'}\n")
    out = subprocess.run([sys.executable, "-m", "elmjax.finetune", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and "nowhere" in out.stderr and "Traceback" not in out.stderr


def test_sft_run_trains_on_chat_data(base, tmp_path):
    import json

    lines = [json.dumps({"messages": [{"role": "user", "content": f"add {i} and 1"},
                                      {"role": "assistant", "content": str(i + 1)}]}) for i in range(30)]
    lines.insert(3, '{"prompt": "no completion"}')
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(lines) + "\n")
    d = tmp_path / "sft"
    result = finetune(ft_config(base, d, f"sft.paths=[{chat}]", "sft.max_invalid=1", "train.steps=4",
                                "peft.method=lora", "data.val_sequences=2", "data.seq_len=64"))
    f = result.final
    assert result.state == "done" and f["sft_examples"] == 30 and f["sft_malformed"] == 1
    assert f["sft_used"] == 30 and np.isfinite(f["val_loss"])
    assert (d / "adapter" / "adapter_config.json").exists()


def test_evaluate_base_adapted_and_merged(base, reference, tmp_path):
    """elmjax.evaluate scores the base, the adapted (unmerged) model and the
    merged export; adapted and merged agree with final.json's 'after'."""
    import json

    from elmjax.evaluate import main as evaluate_main
    from elmjax.peft_io import export_merged

    _, ref = reference
    f = rd.read_final(ref)
    base_model = load_model(base)
    adapters, cfg = load_adapters(ref / "adapter", base_model.cfg)
    export_merged(base_model, adapters, cfg, tmp_path / "merged", tokenizer="byte")
    scores = {}
    for name, args in {"base": ["--checkpoint", str(base)],
                       "adapted": ["--checkpoint", str(base), "--adapter", str(ref / "adapter")],
                       "merged": ["--checkpoint", str(tmp_path / "merged")]}.items():
        out = tmp_path / f"{name}.json"
        assert evaluate_main([*args, "--tasks", TASK, "--out", str(out)]) == 0
        scores[name] = json.loads(out.read_text())["tasks"]["block_colon"]
    assert scores["base"]["acc"] == f["eval_before"]["eval.block_colon.acc"]
    assert scores["adapted"]["acc"] == scores["merged"]["acc"] == f["eval_after"]["eval.block_colon.acc"]
    assert scores["adapted"]["acc_norm"] == scores["merged"]["acc_norm"]


@pytest.mark.parametrize("path", sorted((ROOT / "elmjax" / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_finetune_config_parses(path):
    cfg = config_io.load(FinetuneConfig, path)
    assert config_io.from_dict(FinetuneConfig, config_io.to_dict(cfg)) == cfg
    assert cfg.total_steps >= 1 and cfg.optimizer.lr <= 1e-3
