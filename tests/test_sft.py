"""Chat data for fine-tuning: template, loss mask, packing, validation, segment masking."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.chat_template import ChatTemplate, TemplateError
from elmjax.config import DataConfig
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.sft_config import SFTConfig
from elmjax.sft_data import SFTDataError, encode_example, load_sft, pack, read_examples
from elmjax.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}]


def test_default_template_and_loss_mask_cover_the_exact_tokens():
    tokens, weights = encode_example(CHAT, ChatTemplate("default"), BYTE, SFTConfig())
    prompt = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    answer = "Yo\n"
    assert tokens.tolist() == list((prompt + answer).encode()) + [BYTE.eos_id]
    assert weights.tolist() == [0] * len(prompt) + [1] * len(answer) + [1]  # EOS is trained: the model learns to stop


def test_multi_turn_masks_every_assistant_turn_and_only_those():
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    tokens, weights = encode_example(chat, ChatTemplate("default"), BYTE, SFTConfig(add_eos=False))
    trained = bytes(t for t, w in zip(tokens.tolist(), weights.tolist()) if w).decode()
    assert trained == "b\nd\n"
    _, all_w = encode_example(chat, ChatTemplate("default"), BYTE, SFTConfig(add_eos=False, train_on_prompt=True))
    assert all_w.all()


def test_jinja_template_string_and_file(tmp_path):
    src = "{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }};{% endfor %}"
    f = tmp_path / "t.jinja"
    f.write_text(src)
    for spec in (src, str(f)):
        tokens, weights = encode_example(CHAT[1:], ChatTemplate(spec), BYTE, SFTConfig(add_eos=False))
        assert bytes(tokens.tolist()).decode() == "U: Hi;A: Yo;"
        assert bytes(t for t, w in zip(tokens.tolist(), weights.tolist()) if w).decode() == "Yo;"
    with pytest.raises(TemplateError, match="neither"):
        ChatTemplate(str(tmp_path / "missing.jinja"))
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def _write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


BAD_LINES = [
    {"prompt": "p", "completion": "c"},  # 1 ok
    '{"messages": [',  # 2 invalid JSON
    {"messages": [{"role": "user", "content": "no answer"}]},  # 3 no assistant
    {"messages": [{"role": "bot", "content": "x"}]},  # 4 bad role
    "",  # 5 blank: skipped
    {"prompt": 3, "completion": "c"},  # 6 prompt not a string
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # 7 ok
]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    f = _write(tmp_path / "chat.jsonl", BAD_LINES)
    with pytest.raises(SFTDataError) as e:
        read_examples([f])
    msg = str(e.value)
    assert msg.startswith("4 malformed example(s)")
    assert f"{f}:2: invalid JSON" in msg and f"{f}:3: no assistant message" in msg
    assert f"{f}:4: messages[0].role 'bot'" in msg and f"{f}:6: 'prompt' must be a string" in msg
    assert f"{f}:1" not in msg and f"{f}:7" not in msg
    examples, problems = read_examples([f], max_invalid=4)
    assert len(examples) == 2 and len(problems) == 4


def test_packing_carries_the_loss_mask_and_segments():
    a = (np.array([10, 11, 12], np.int32), np.array([0, 1, 1], np.int32))
    b = (np.array([20, 21], np.int32), np.array([1, 1], np.int32))  # first token trained: must be unset
    c = (np.array([30, 31, 32, 33], np.int32), np.array([0, 0, 1, 1], np.int32))
    rows = pack([a, b, c], 6)
    assert rows.shape == (2, 4, 6)
    np.testing.assert_array_equal(rows[0], [[10, 11, 12, 20, 21, 0], [0, 1, 1, 0, 1, 0], [1, 1, 1, 2, 2, 0],
                                            [0, 1, 2, 0, 1, 0]])
    np.testing.assert_array_equal(rows[1], [[30, 31, 32, 33, 0, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                                            [0, 1, 2, 3, 0, 0]])


def test_truncation_policies_and_stats(tmp_path):
    long = {"prompt": "p" * 40, "completion": "the answer"}
    f = _write(tmp_path / "c.jsonl", [long] + [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)])
    data = DataConfig(seq_len=32, val_fraction=0.2, val_sequences=4)
    drop = load_sft(SFTConfig(paths=(str(f),), truncation="drop"), data)
    assert drop.stats["too_long"] == 1 and drop.stats["used"] == 6
    left = load_sft(SFTConfig(paths=(str(f),), truncation="left"), data)
    assert left.stats["used"] == 7
    rows = np.concatenate([left.train_rows, left.validation.tokens])
    # The cut example keeps its answer's end (and EOS) in some row.
    assert any(bytes(x for x in r[0] if x < 256).find(b"the answer") >= 0 for r in rows)
    assert rows.shape[1:] == (4, 33)


def test_packed_examples_cannot_attend_across_boundaries():
    cfg = ModelConfig(num_layers=1, model_dim=32, head_dim=8, num_gqa_groups=2, ffn_dim_divisor=8, vocab_size=61)
    model = OpenELM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ex1, ex2 = rng.integers(0, 61, 5), rng.integers(0, 61, 4)
    seg = jnp.asarray([[1] * 5 + [2] * 4])
    pos = jnp.asarray([list(range(5)) + list(range(4))])

    apply = nnx.jit(lambda m, t, p, s: m(t, p, segment_ids=s))

    def packed(first):
        return np.asarray(apply(model, jnp.asarray([np.concatenate([first, ex2])]), pos, seg))[0]

    changed = rng.integers(0, 61, 5)
    np.testing.assert_array_equal(packed(ex1)[5:], packed(changed)[5:])
    assert np.abs(packed(ex1)[:5] - packed(changed)[:5]).max() > 1e-4
    # ... and example 2 packed behind example 1 is example 2 alone.
    alone = np.asarray(model(jnp.asarray([ex2])))[0]
    np.testing.assert_allclose(packed(ex1)[5:], alone, rtol=1e-5, atol=1e-5)
    # Without segment ids the second example would see the first.
    plain = lambda first: np.asarray(apply(model, jnp.asarray([np.concatenate([first, ex2])]), pos, None))[0]
    assert np.abs(plain(ex1)[5:] - plain(changed)[5:]).max() > 1e-4


def test_row_iterator_resumes_exactly_and_covers_each_epoch():
    from elmjax.sft_data import RowIterator

    rows = np.arange(7 * 4 * 3, dtype=np.int32).reshape(7, 4, 3)
    it = RowIterator(rows, 3, seed=5)
    first = np.concatenate([next(it) for _ in range(7)])  # 21 rows = 3 epochs
    for e in range(3):
        assert sorted(first[7 * e:7 * e + 7, 0, 0].tolist()) == sorted(rows[:, 0, 0].tolist())
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = RowIterator(rows, 3, seed=5)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again), w)
