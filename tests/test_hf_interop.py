import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from elmjax.hf_interop import CheckpointError, config_to_hf, expected_hf_shapes, from_pretrained, save_pretrained
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig

import openelm_reference

CFG = ModelConfig(num_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2, qkv_multipliers=(0.5, 1.0),
                  ffn_multipliers=(0.5, 2.0), ffn_dim_divisor=16, vocab_size=101)
apply = nnx.jit(lambda model, tokens: model(tokens))


def released_style_checkpoint(path, cfg=CFG, seed=0, dtype=np.float32):
    """A random checkpoint written the way Apple's files are: Hub names, [out, in]
    weights, per-layer head lists, and no elmjax-specific config fields."""
    rng = np.random.default_rng(seed)
    tensors = {k: (rng.standard_normal(s) * (0.2 if len(s) > 1 else 0.1) + (1.0 if len(s) == 1 else 0.0)).astype(dtype)
               for k, s in expected_hf_shapes(cfg).items()}
    hf = config_to_hf(cfg, "float32")
    del hf["elmjax"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(path / "model.safetensors"))
    return hf, tensors


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(tie_embeddings=False, num_gqa_groups=1, qkv_multipliers=1.0)])
def test_logits_match_independent_reference(tmp_path, cfg):
    hf, tensors = released_style_checkpoint(tmp_path, cfg)
    model = from_pretrained(tmp_path)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
    ours = np.asarray(apply(model, jnp.asarray(tokens)))
    ref = openelm_reference.forward(hf, tensors, tokens)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
    # The comparison has teeth: a model with the SwiGLU halves swapped differs.
    wrong = openelm_reference.forward(hf, tensors, tokens, swap_glu=True)
    assert np.abs(wrong - ref).max() > 100 * np.abs(ours - ref).max()


def test_round_trip_is_exact(tmp_path):
    cfg = CFG.replace(qkv_schedule="middle", ffn_multipliers=[1.0, 3.0, 0.5])
    model = OpenELM(cfg, rngs=nnx.Rngs(3))
    save_pretrained(model, tmp_path / "ckpt")
    back = from_pretrained(tmp_path / "ckpt")
    assert back.cfg == cfg
    a = jax.tree.leaves(nnx.state(model, nnx.Param))
    b = jax.tree.leaves(nnx.state(back, nnx.Param))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # And the files round-trip too: saving the loaded model gives identical tensors.
    save_pretrained(back, tmp_path / "again")
    t1, t2 = load_file(str(tmp_path / "ckpt/model.safetensors")), load_file(str(tmp_path / "again/model.safetensors"))
    assert t1.keys() == t2.keys() == expected_hf_shapes(cfg).keys()
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k])


def test_bfloat16_files_load_as_float32_params(tmp_path):
    model = OpenELM(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path, dtype="bfloat16")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
    back = from_pretrained(tmp_path)
    for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
        assert y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), y)


def test_sharded_checkpoint(tmp_path):
    model = OpenELM(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    back = from_pretrained(tmp_path)
    tokens = jnp.arange(6)[None]
    np.testing.assert_array_equal(apply(model, tokens), apply(back, tokens))


def test_config_from_released_fields_reproduces_head_lists(tmp_path):
    hf, _ = released_style_checkpoint(tmp_path)
    model = from_pretrained(tmp_path)
    from elmjax.layout import layer_layout

    assert [x.q_heads for x in layer_layout(model.cfg)] == hf["num_query_heads"]
    assert [x.kv_heads for x in layer_layout(model.cfg)] == hf["num_kv_heads"]


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    released_style_checkpoint(tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    t["transformer.layers.1.ffn.proj_2.weight"] = t["transformer.layers.1.ffn.proj_2.weight"][:, :-16].copy()
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer\.layers\.1\.ffn\.proj_2\.weight.*\(64, \d+\).*\(64, \d+\)"):
        from_pretrained(tmp_path)


def test_missing_and_unexpected_keys(tmp_path):
    released_style_checkpoint(tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["transformer.layers.2.attn.k_norm.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*layers.2.attn.k_norm"):
        from_pretrained(tmp_path)
    t["transformer.layers.2.attn.k_norm.weight"] = np.ones(16, np.float32)
    t["transformer.layers.2.attn.bias"] = np.ones(16, np.float32)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.layers.2.attn.bias'"):
        from_pretrained(tmp_path)


def test_unknown_layout_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: no such file"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="missing key.*num_transformer_layers.*not an OpenELM config"):
        from_pretrained(tmp_path)
    hf = config_to_hf(CFG, "float32")
    del hf["elmjax"]
    hf["num_kv_heads"] = [1, 1, 1]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"num_kv_heads \[1, 1, 1\] disagrees with the derived layout"):
        from_pretrained(tmp_path)
    del hf["num_kv_heads"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="model.safetensors: weight file missing"):
        from_pretrained(tmp_path)


def test_save_leaves_no_temporary_files(tmp_path):
    save_pretrained(OpenELM(CFG, rngs=nnx.Rngs(0)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


SMALL = ModelConfig(num_layers=2, model_dim=32, head_dim=16, num_gqa_groups=1, ffn_dim_divisor=16, vocab_size=320)


def test_save_pretrained_writes_the_byte_tokenizers_ids_and_records_it(tmp_path):
    from elmjax.generate import tokenizer_spec_for

    model = OpenELM(SMALL, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "byte", tokenizer="byte")
    hf = json.loads((tmp_path / "byte" / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (257, 256)
    assert tokenizer_spec_for(tmp_path / "byte") == "byte"
    # Without a tokenizer nothing is guessed: null ids, and the CLIs ask for --tokenizer.
    save_pretrained(model, tmp_path / "none")
    hf = json.loads((tmp_path / "none" / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (None, None)


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_save_pretrained_saves_the_tokenizer_file_next_to_the_weights(tmp_path, kind):
    from test_tokenizer import train_hf, train_sentencepiece

    from elmjax.generate import load_for_inference
    from elmjax.tokenizer import load_tokenizer

    src = train_hf(tmp_path) if kind == "hf" else train_sentencepiece(tmp_path)
    tok = load_tokenizer(f"{kind}:{src}")
    save_pretrained(OpenELM(SMALL, rngs=nnx.Rngs(0)), tmp_path / "out", tokenizer=tok)
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    name = "tokenizer.json" if kind == "hf" else "tokenizer.model"
    assert (tmp_path / "out" / name).read_bytes() == src.read_bytes()
    # generate/evaluate find it without --tokenizer, and it is the same tokenizer.
    _, back = load_for_inference(tmp_path / "out")
    assert back.spec == f"{kind}:{tmp_path / 'out' / name}"
    assert back.encode("alpha beta gamma") == tok.encode("alpha beta gamma") and back.eos_id == tok.eos_id


def _perturbed_mup_model(cfg):
    """A muP model whose norm gains are not all ones, so folding a multiplier into them is not trivial."""
    model = OpenELM(cfg, rngs=nnx.Rngs(4))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(5)
    pure = jax.tree_util.tree_map_with_path(
        lambda p, x: x * (1 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32) if p[-1].key == "weight" else x,
        pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("changes", [{}, {"normalize_qk": False}, {"tie_embeddings": False}])
def test_mup_export_folds_its_multipliers_into_a_standard_openelm(tmp_path, changes):
    cfg = CFG.replace(qkv_multipliers=(0.5, 1.5), parametrization="mup", mup_base_width=32, **changes)
    model = _perturbed_mup_model(cfg)
    save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert "parametrization" not in hf["elmjax"] and "mup_base_width" not in hf["elmjax"]
    back = from_pretrained(tmp_path)
    assert back.cfg == cfg.replace(parametrization="standard", mup_base_width=128)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
    ours = np.asarray(apply(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(np.asarray(apply(back, jnp.asarray(tokens))), ours, rtol=1e-5, atol=1e-5)
    # An independent OpenELM implementation reading the files agrees too.
    ref = openelm_reference.forward(hf, load_file(str(tmp_path / "model.safetensors")), tokens)
    np.testing.assert_allclose(ref, ours, rtol=2e-4, atol=2e-4)
    # The folding matters: the same weights run as a standard model give other logits.
    graphdef, _ = nnx.split(back)
    unfolded = nnx.merge(graphdef, nnx.state(model, nnx.Param))
    assert np.abs(np.asarray(apply(unfolded, jnp.asarray(tokens))) - ours).max() > 0.05


def test_mup_run_checkpoint_stays_mup(tmp_path):
    from elmjax import config_io
    from elmjax.config import Config

    cfg = Config(model=CFG.replace(parametrization="mup", mup_base_width=32))
    (tmp_path / "config.yaml").write_text(config_io.dump_yaml(cfg))
    assert config_io.load(Config, tmp_path / "config.yaml").model == cfg.model
