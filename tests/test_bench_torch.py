import numpy as np
import pytest
from flax import nnx

import elmjax.bench_torch as bt
from elmjax.hf_interop import config_to_hf, params_to_hf
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig

TINY = ModelConfig(num_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2, qkv_multipliers=(0.5, 1.0),
                   ffn_multipliers=(0.5, 2.0), ffn_dim_divisor=16, vocab_size=97)


def test_without_pytorch_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(bt, "_torch", lambda: None)
    assert bt.main(["--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "PyTorch is not installed" in err and "pip install torch" in err


def test_the_pytorch_port_computes_elmjax_logits():
    torch = pytest.importorskip("torch")
    model = OpenELM(TINY, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    port = bt.TorchOpenELM(torch, config_to_hf(TINY, "float32"), params_to_hf(TINY, params), TINY.norm_eps)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 11))
    want = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    got = port(torch.from_numpy(tokens)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The layer-wise head counts matter: another model's weights give other logits, so the check can fail.
    other = OpenELM(TINY, rngs=nnx.Rngs(1))
    other_port = bt.TorchOpenELM(torch, config_to_hf(TINY, "float32"),
                                 params_to_hf(TINY, nnx.to_pure_dict(nnx.state(other, nnx.Param))), TINY.norm_eps)
    assert not np.allclose(other_port(torch.from_numpy(tokens)).detach().numpy(), want, atol=1e-2)


def test_separate_adds_up_each_sides_processes_and_names_a_failing_one(monkeypatch, capsys):
    calls = []

    class Done:
        def __init__(self, cmd, seconds, rc=0):
            self.returncode, self.stdout, self.stderr = rc, f"first loss: ...\ntimed {seconds} s\n", "boom" if rc else ""

    def fake_run(cmd, capture_output, text):
        calls.append(cmd)
        side = cmd[cmd.index("--side") + 1]
        return Done(cmd, 2.0 if side == "elmjax" else 1.0)

    fake_torch = type("FakeTorch", (), {"get_num_threads": staticmethod(lambda: 2)})
    monkeypatch.setattr(bt, "_torch", lambda: fake_torch)
    monkeypatch.setattr(bt.subprocess, "run", fake_run)
    assert bt.main(["--separate", "--rounds", "2", "--steps", "5", "--batch", "4", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 4 and all("--separate" not in c and c[c.index("--rounds") + 1] == "1" and c.count("--rounds") == 1 for c in calls)
    assert "ratio elmjax / PyTorch tokens/s: 0.500" in out  # 4 s of elmjax steps against 2 s of PyTorch's

    monkeypatch.setattr(bt.subprocess, "run", lambda cmd, capture_output, text: Done(cmd, 1.0, rc=1))
    assert bt.main(["--separate", "--rounds", "1"]) == 1
    assert "failed" in capsys.readouterr().err


def test_a_bad_config_is_named_before_anything_is_compiled_or_spawned(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layerz: 2\n")
    fake_torch = type("FakeTorch", (), {"get_num_threads": staticmethod(lambda: 2)})
    monkeypatch.setattr(bt, "_torch", lambda: fake_torch)
    monkeypatch.setattr(bt.subprocess, "run", lambda *a, **k: pytest.fail("spawned a side for a bad config"))
    assert bt.main(["--config", str(bad), "--separate"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "num_layerz" in err
