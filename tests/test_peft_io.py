"""Adapters in the Hugging Face PEFT layout, and merged exports (elmjax.peft_io)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from elmjax import peft, peft_io
from elmjax.checkpoint import CheckpointError
from elmjax.hf_interop import from_pretrained, params_to_hf
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.peft import PeftConfig

CFG = ModelConfig(num_layers=3, model_dim=32, head_dim=8, num_gqa_groups=2, qkv_multipliers=(0.5, 1.0),
                  ffn_multipliers=(0.5, 2.0), ffn_dim_divisor=8, vocab_size=61)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7)))


@pytest.fixture(scope="module")
def model():
    return OpenELM(CFG, rngs=nnx.Rngs(0))


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def trained_adapters(params, cfg, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape), jnp.float32),
                        peft.init_adapters(params, cfg, CFG.num_layers))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_round_trip_and_key_names(tmp_path, model, method):
    cfg = PeftConfig(method=method, rank=3, alpha=5.0, targets=("qkv", "ffn_out"), layers=(0, 2))
    adapters = trained_adapters(params_of(model), cfg)
    peft_io.save_adapters(tmp_path, adapters, cfg, CFG, base_name="apple/OpenELM-270M")
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["peft_type"] == "LORA" and hf["r"] == 3 and hf["lora_alpha"] == 5.0
    assert hf["target_modules"] == ["qkv_proj", "proj_2"] and hf["layers_to_transform"] == [0, 2]
    assert hf["use_dora"] is (method == "dora")
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    want = {f"base_model.model.transformer.layers.{i}.{m}.{w}" for i in (0, 2)
            for m in ("attn.qkv_proj", "ffn.proj_2")
            for w in ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if method == "dora" else ())}
    assert keys == want
    loaded, cfg2 = peft_io.load_adapters(tmp_path, CFG)
    assert cfg2 == cfg
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saved_tensors_are_hub_oriented(tmp_path, model):
    """W_hub' = W_hub + s B A with the saved tensors, for every target: the
    PEFT reading of the file is the update elmjax applies (qkv rows in the
    Hub's [queries, keys, values] order)."""
    params = params_of(model)
    cfg = PeftConfig(rank=2, alpha=3.0)
    adapters = trained_adapters(params, cfg)
    peft_io.save_adapters(tmp_path, adapters, cfg, CFG)
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    base_hf = params_to_hf(CFG, params)
    merged_hf = params_to_hf(CFG, jax.device_get(peft.merge(params, adapters, cfg)))
    for i in range(CFG.num_layers):
        for module in ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"):
            p = f"transformer.layers.{i}.{module}."
            want = base_hf[p + "weight"] + 1.5 * t["base_model.model." + p + "lora_B.weight"] @ t[
                "base_model.model." + p + "lora_A.weight"]
            np.testing.assert_allclose(merged_hf[p + "weight"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_export_matches_unmerged(tmp_path, model, method):
    params = params_of(model)
    cfg = PeftConfig(method=method, rank=4)
    adapters = trained_adapters(params, cfg)
    graphdef, _ = nnx.split(model)
    unmerged = np.asarray(nnx.merge(graphdef, peft.effective_params(params, adapters, cfg))(TOKENS))
    peft_io.export_merged(model, adapters, cfg, tmp_path / "merged", tokenizer="byte")
    merged = np.asarray(from_pretrained(tmp_path / "merged")(TOKENS))
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    base = np.asarray(model(TOKENS))
    assert np.abs(merged - base).max() > 1e-3


def test_bad_adapter_files(tmp_path, model):
    cfg = PeftConfig(rank=2, targets=("out",))
    peft_io.save_adapters(tmp_path, trained_adapters(params_of(model), cfg), cfg, CFG)
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.transformer.layers.1.attn.out_proj.lora_A.weight"
    save_file({**t, key: np.zeros((3, t[key].shape[1]), np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: .*lora_A.weight' has shape \(3, "):
        peft_io.load_adapters(tmp_path, CFG)
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**hf, "target_modules": ["q_proj"]}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: target_modules \['q_proj'\]"):
        peft_io.load_adapters(tmp_path, CFG)
    with pytest.raises(CheckpointError, match="no such file"):
        peft_io.load_adapters(tmp_path / "nowhere", CFG)
