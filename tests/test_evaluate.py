import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.evaluate import TaskFileError, as_columns, evaluate_tasks, load_task, main
from elmjax.hf_interop import save_pretrained
from elmjax.bench_generate import random_model
from elmjax.model_config import ModelConfig
from elmjax.tokenizer import ByteTokenizer

TINY = ModelConfig(num_layers=2, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, max_context_length=64)

QUESTIONS = [
    {"context": "The sky is", "choices": [" blue", " green", " a"], "gold": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 22", " four"], "gold": 2},
    {"context": "Cats say", "choices": [" meow", " woof"], "gold": 0},
    {"context": "", "choices": ["yes", "no"], "gold": 1},
    {"context": "Water is ", "choices": ["wet", "dry as a bone"], "gold": 1},
    {"context": "Ice is", "choices": [" cold", " hot"], "gold": 0, "id": "extra fields are ignored"},
]


@pytest.fixture(scope="module")
def model():
    return random_model(TINY)


def write_task(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@nnx.jit
def _logp(model, tokens):
    return jax.nn.log_softmax(model(tokens), axis=-1)


def reference(model, rows):
    """Accuracies computed by hand: byte ids, EOS for an empty context, one unbatched pass per choice."""
    acc, acc_norm = [], []
    for r in rows:
        ctx = r["context"].rstrip()
        lls = []
        for c in r["choices"]:
            cont = r["context"][len(ctx):] + c
            ids = [256] + list(cont.encode()) if not ctx else list((ctx + cont).encode())
            n_ctx = 1 if not ctx else len(ctx.encode())
            seq = np.zeros((1, 64), np.int32)
            seq[0, : len(ids)] = ids
            logp = np.asarray(_logp(model, jnp.asarray(seq)))[0]
            lls.append(sum(logp[p - 1, ids[p]] for p in range(n_ctx, len(ids))))
        acc.append(float(np.argmax(lls) == r["gold"]))
        acc_norm.append(float(np.argmax(np.array(lls) / [len(c.encode()) for c in r["choices"]]) == r["gold"]))
    return acc, acc_norm


def test_evaluate_tasks_equals_a_hand_computed_reference(model, tmp_path):
    write_task(tmp_path / "mini.jsonl", QUESTIONS)
    write_task(tmp_path / "other.jsonl", QUESTIONS[:2])
    res = evaluate_tasks(model, ByteTokenizer(), [tmp_path / "mini.jsonl", tmp_path / "other.jsonl"])
    assert list(res) == ["mini", "other"]
    acc, acc_norm = reference(model, QUESTIONS)
    r = res["mini"]
    assert r["n"] == 6
    assert r["acc"] == pytest.approx(np.mean(acc)) and r["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert r["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(6))
    assert r["acc_norm_stderr"] == pytest.approx(np.std(acc_norm, ddof=1) / math.sqrt(6))
    assert res["other"]["acc"] == pytest.approx(np.mean(acc[:2]))
    cols = as_columns(res)
    assert sorted(cols) == ["eval.mini.acc", "eval.mini.acc_norm", "eval.other.acc", "eval.other.acc_norm"]
    assert cols["eval.mini.acc_norm"] == r["acc_norm"]


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x", "y"]}', r"bad.jsonl:2: missing field 'gold'"),
    ('{"context": "a", "gold": 0}', r"bad.jsonl:2: missing field 'choices'"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}', r"bad.jsonl:2: gold 2 is out of range for 2 choices"),
    ('{"context": "a", "choices": ["x", "y"], "gold": -1}', r"bad.jsonl:2: gold -1 is out of range"),
    ('{"context": "a", "choices": ["x", "y"], "gold": true}', r"bad.jsonl:2: 'gold' must be an integer"),
    ('{"context": "a", "choices": ["x", ""], "gold": 0}', r"bad.jsonl:2: choices\[1\] must be a non-empty string"),
    ('{"context": "a", "choices": "xy", "gold": 0}', r"bad.jsonl:2: 'choices' must be a list"),
    ('{"context": 3, "choices": ["x", "y"], "gold": 0}', r"bad.jsonl:2: 'context' must be a string"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 0', r"bad.jsonl:2: invalid JSON"),
    ('["a"]', r"bad.jsonl:2: expected a JSON object"),
])
def test_bad_task_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + line + "\n")
    with pytest.raises(TaskFileError, match=message):
        load_task(path)


def test_bad_task_files(tmp_path, model):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskFileError, match="empty.jsonl: no examples"):
        load_task(tmp_path / "empty.jsonl")
    with pytest.raises(TaskFileError, match="missing.jsonl: cannot read"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "b").mkdir()
    write_task(tmp_path / "t.jsonl", QUESTIONS)
    write_task(tmp_path / "b" / "t.jsonl", QUESTIONS)
    with pytest.raises(TaskFileError, match="task name 't' is used by two files"):
        evaluate_tasks(model, ByteTokenizer(), [tmp_path / "t.jsonl", tmp_path / "b" / "t.jsonl"])


def test_cli_prints_a_table_and_writes_json(model, tmp_path, capsys):
    save_pretrained(model, tmp_path / "hf")
    task = write_task(tmp_path / "mini.jsonl", QUESTIONS)
    out = tmp_path / "results.json"
    assert main(["--checkpoint", str(tmp_path / "hf"), "--tokenizer", "byte", "--tasks", str(task), "--out", str(out)]) == 0
    expected = evaluate_tasks(model, ByteTokenizer(), [task])["mini"]
    table = capsys.readouterr().out
    assert "acc_norm" in table and f"{expected['acc']:.4f} ± {expected['acc_stderr']:.4f}" in table
    record = json.loads(out.read_text())
    assert record["tokenizer"] == "byte"
    assert record["tasks"]["mini"] == pytest.approx(expected)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "gold": 5}\n')
    out = tmp_path / "results.json"
    assert main(["--checkpoint", str(tmp_path), "--tasks", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1: gold 5 is out of range" in capsys.readouterr().err
    assert not out.exists()
    good = write_task(tmp_path / "good.jsonl", QUESTIONS)
    assert main(["--checkpoint", str(tmp_path / "nope"), "--tasks", str(good)]) == 2
    assert "no such file" in capsys.readouterr().err
