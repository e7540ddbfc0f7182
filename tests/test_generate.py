import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import elmjax
from elmjax.generate import (decode_step, generate, generate_recompute, main, prefill, sample,
                             tokenizer_spec_for)
from elmjax.hf_interop import save_pretrained
from elmjax.layout import layer_layout
from elmjax.bench_generate import random_model
from elmjax.model_config import ModelConfig
from compile_log import compilations
from elmjax.tokenizer import ByteTokenizer

# Two layers with different kv head counts (1 and 2): the caches differ in shape per layer.
TINY = ModelConfig(num_layers=2, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16,
                   max_context_length=128)
PROMPTS = [[5, 17, 99, 3, 200, 41, 7], [9, 250], [1, 2, 3, 4]]


@pytest.fixture(scope="module")
def model():
    assert len({lay.kv_heads for lay in layer_layout(TINY)}) > 1
    return random_model(TINY)


@nnx.jit
def _full_logits(model, tokens):
    return model(tokens)


_prefill = nnx.jit(prefill, static_argnums=2)
_step = nnx.jit(decode_step)


def test_cached_decoding_matches_full_recompute_every_step(model):
    """Rows of different lengths, right-padded: each step's cached logits equal
    the logits of the whole sequence so far run through the model (by
    causality, position p of one full forward pass is that recomputation)."""
    lengths = np.array([7, 3])
    steps = 6
    seqs = np.asarray(jax.random.randint(jax.random.key(1), (2, 7 + steps), 0, TINY.vocab_size))
    full = np.asarray(_full_logits(model, jnp.asarray(seqs)))
    prompt = seqs[:, :8].copy()
    prompt[np.arange(8)[None] >= lengths[:, None]] = 0  # right padding
    logits, caches = _prefill(model, jnp.asarray(prompt), 8 + steps)
    for b in range(2):
        np.testing.assert_allclose(logits[b, : lengths[b]], full[b, : lengths[b]], atol=2e-5, rtol=2e-5)
    for t in range(steps):
        pos = lengths + t
        step_logits, caches = _step(model, jnp.asarray(seqs[[0, 1], pos]), jnp.asarray(pos), caches)
        np.testing.assert_allclose(step_logits, full[[0, 1], pos], atol=2e-5, rtol=2e-5)


def test_greedy_equals_recompute_and_is_deterministic(model):
    out = generate(model, PROMPTS, 10)
    assert out == generate_recompute(model, PROMPTS, 10)
    assert out == generate(model, PROMPTS, 10)
    assert [len(o) for o in out] == [10, 10, 10]


def test_batched_generation_equals_one_by_one(model):
    batched = generate(model, PROMPTS, 10)
    singles = [generate(model, p, 10) for p in PROMPTS]
    assert isinstance(singles[0][0], int)
    assert batched == singles


def test_decode_loop_compiles_once_per_shape(model):
    generate(model, [[1, 2, 3]], 10)
    with compilations("_generate_core") as compiled:
        # Another prompt length in the same bucket, other sampling values, same mode: no recompilation.
        generate(model, [[4, 5, 6, 7, 8]], 10)
        generate(model, [[4, 5]], 10, temperature=0.7, top_k=5, seed=1)
        generate(model, [[4, 5]], 10, temperature=1.3, top_p=0.5, seed=2)
    assert len(compiled) == 1  # only the 'filter' sampling mode compiled


def test_stop_tokens_end_each_row(model):
    free = generate(model, PROMPTS, 10)
    # For each row, the first token that differs from its first one: a stop mid-generation.
    stops = {next(t for t in row if t != row[0]) for row in free if len(set(row)) > 1}
    assert stops
    out = generate(model, PROMPTS, 10, stop_tokens=sorted(stops))
    for f, o in zip(free, out):
        cut = min([f.index(s) for s in stops if s in f] + [len(f)])
        assert o == f[:cut]
    assert any(0 < len(o) < 10 for o in out)


def test_sampling_is_seeded_and_filters_reduce_to_greedy(model):
    prompt = PROMPTS[1]
    a = generate(model, prompt, 10, temperature=1.0, seed=3)
    assert a == generate(model, prompt, 10, temperature=1.0, seed=3)
    assert a != generate(model, prompt, 10, temperature=1.0, seed=4)
    greedy = generate(model, prompt, 10)
    assert a != greedy
    assert generate(model, prompt, 10, top_k=1, seed=5) == greedy
    assert generate(model, prompt, 10, top_p=1e-6, seed=5) == greedy
    assert generate(model, prompt, 10, temperature=0.0) == greedy


def test_top_k_and_top_p_sample_only_the_allowed_tokens():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    draw = jax.jit(jax.vmap(lambda k, tk, tp: sample(logits, k, 1.0, tk, tp, "filter")[0], (0, None, None)))
    keys = jax.random.split(jax.random.key(0), 2000)
    assert set(np.asarray(draw(keys, 2, 1.0)).tolist()) == {1, 3}
    # Mass before token: 1 -> 0, 3 -> 0.4, 2 -> 0.7: top_p 0.6 keeps {1, 3}, 0.75 adds 2.
    assert set(np.asarray(draw(keys, 0, 0.6)).tolist()) == {1, 3}
    assert set(np.asarray(draw(keys, 0, 0.75)).tolist()) == {1, 2, 3}
    counts = np.bincount(np.asarray(draw(keys, 0, 1.0)), minlength=4) / 2000
    np.testing.assert_allclose(counts, [0.1, 0.4, 0.2, 0.3], atol=0.04)


def test_bad_inputs_are_rejected(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="max_context_length 128"):
        generate(model, [[1] * 100], 40)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 259\)"):
        generate(model, [[1, 259]], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)


def test_elmjax_generate_is_the_function_and_the_module_is_the_cli(model):
    assert elmjax.generate(model, [1, 2, 3], 4) == generate(model, [1, 2, 3], 4)
    # A fresh interpreter: the lazy attribute is the function, and running the
    # module as a script (what `python -m elmjax.generate` does) is the CLI.
    code = ("import elmjax, runpy, sys; f = elmjax.generate; import elmjax.generate as m; print(f is m.generate, callable(m)); "
            "sys.argv = ['x', '--help']; runpy.run_module('elmjax.generate', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == ["True", "True"] and "--checkpoint" in res.stdout


def test_cli_on_a_hugging_face_directory(model, tmp_path, capsys):
    save_pretrained(model, tmp_path / "hf")
    assert main(["--checkpoint", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", "Hi", "--max-new-tokens", "10",
                 "--no-stop"]) == 0
    expected = "Hi" + ByteTokenizer().decode(generate(model, ByteTokenizer().encode("Hi"), 10))
    assert capsys.readouterr().out.splitlines()[0] == expected.splitlines()[0]
    # No tokenizer in the directory and none given: a clear error, not a crash.
    assert main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "Hi"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "Hi"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tokenizer_spec_comes_from_the_run_config_or_the_hf_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data:\n  tokenizer: hf:/somewhere/tokenizer.json\n")
    assert tokenizer_spec_for(tmp_path / "run") == "hf:/somewhere/tokenizer.json"
    assert tokenizer_spec_for(tmp_path / "run" / "checkpoints") == "hf:/somewhere/tokenizer.json"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"")
    assert tokenizer_spec_for(tmp_path / "hf") == f"sentencepiece:{tmp_path / 'hf' / 'tokenizer.model'}"


@pytest.mark.slow  # trains two steps first (~15-30 s on 2 cores)
def test_cli_on_a_training_run_directory(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from train_helpers import tiny_config

    from elmjax.checkpoint import load_model
    from elmjax.train import run

    cfg = tiny_config(tmp_path / "run", "train.steps=2", "checkpoint.every=2", "checkpoint.async_save=false",
                      "data.val_sequences=8")
    assert run(cfg).state == "done"
    # The tokenizer comes from the run's config.yaml: no --tokenizer.
    assert main(["--checkpoint", str(tmp_path / "run"), "--prompt", "Hello", "--max-new-tokens", "10"]) == 0
    tok = ByteTokenizer()
    trained = load_model(tmp_path / "run")
    expected = "Hello" + tok.decode(generate(trained, tok.encode("Hello"), 10, stop_tokens=[tok.eos_id]))
    assert capsys.readouterr().out.splitlines()[0] == expected.splitlines()[0]
