"""The held-out test split: after the validation rows, disjoint from train and validation, scored once at the end."""

import json

import numpy as np
import pytest

from elmjax import data
from elmjax.config import Config, DataConfig, identity
from elmjax.corpus import DataError, pack
from test_data import _docs, _write_jsonl


@pytest.fixture
def corpus(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", _docs())
    return DataConfig(source="jsonl", paths=(str(tmp_path / "a.jsonl"),), seq_len=16, batch_size=8,
                      val_fraction=0.2, val_sequences=6, test_sequences=20, seed=3)


def _text(stream: np.ndarray) -> str:
    return bytes(int(t) for t in stream if t < 256).decode("utf-8", "replace")


def test_test_rows_follow_the_validation_rows_and_leave_train_and_val_unchanged(corpus):
    off = DataConfig(**{**corpus.__dict__, "test_sequences": 0})
    assert data.test_set(off) is None
    val, test = data.validation_set(corpus), data.test_set(corpus)
    np.testing.assert_array_equal(val.tokens, data.validation_set(off).tokens)  # validation unchanged
    np.testing.assert_array_equal(next(data.train_iterator(corpus)), next(data.train_iterator(off)))
    table = pack(data._in_memory_streams(corpus).val, 16)
    np.testing.assert_array_equal(test.tokens, table[6:26])
    assert test.tokens.shape == (20, 17) and not test.tokens.flags.writeable
    # Targets (positions 1..) never repeat a validation target position: the rows tile the held-out stream.
    assert test.tokens[0, 0] == val.tokens[-1, -1]
    assert test.row_bytes.tolist() == (test.tokens[:, 1:] < 256).sum(1).tolist()
    # No document of the test rows is in the training stream (documents carry unique @@NNNN@@ markers).
    import re

    stream = np.concatenate([test.tokens[:1, 0], test.tokens[:, 1:].ravel()])  # rows share one token at the seams
    markers = set(re.findall(r"@@\d{4}@@", _text(stream)))
    assert markers
    train_text = _text(data._in_memory_streams(corpus).train)
    assert not [m for m in markers if m in train_text]


def test_prepared_arrayrecord_gives_the_same_test_rows(corpus, tmp_path):
    out = tmp_path / "packed"
    data.prepare(corpus, out, shard_size=50, progress=False)
    ar = DataConfig(**{**corpus.__dict__, "source": "arrayrecord", "paths": (str(out),)})
    np.testing.assert_array_equal(data.test_set(ar).tokens, data.test_set(corpus).tokens)
    np.testing.assert_allclose(data.test_set(ar).row_bytes, data.test_set(corpus).row_bytes)


def test_a_test_split_the_held_out_data_cannot_fill_names_the_keys(corpus):
    big = DataConfig(**{**corpus.__dict__, "test_sequences": 10_000})
    with pytest.raises(DataError, match=r"data.val_sequences \+ data.test_sequences needs"):
        data.test_set(big)
    with pytest.raises(ValueError, match="test_sequences must be >= 0"):
        DataConfig(test_sequences=-1)


def test_no_test_split_keeps_run_identities():
    """Runs planned before the field existed keep their names (and checkpoints)."""
    assert "test_sequences" not in identity(Config())["data"]
    assert identity(Config(data=DataConfig(test_sequences=8)))["data"]["test_sequences"] == 8


def test_final_json_has_test_metrics_and_split_fingerprints(tmp_path):
    from elmjax.train import run
    from train_helpers import tiny_config

    cfg = tiny_config(tmp_path / "run", "data.test_sequences=8", "train.steps=6", "train.eval_every=6",
                      "checkpoint.enabled=false")
    assert run(cfg).state == "done"
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    test = data.test_set(cfg.data)
    assert final["test_fingerprint"] == data.batch_fingerprint(test.tokens)
    assert final["val_fingerprint"] == data.batch_fingerprint(data.validation_set(cfg.data).tokens)
    assert final["test_bpb"] == pytest.approx(final["test_loss"] / np.log(2) / test.bytes_per_token, rel=1e-9)
    assert np.isfinite(final["test_loss"]) and final["test_loss"] != final["val_loss"]
    # the test split is scored once, at the end: never in the training log
    from elmjax import run_dir as rd

    assert not [r for r in rd.read_metrics(tmp_path / "run") if "test_loss" in r]


def test_scoring_the_test_split_counts_in_the_run_times(tmp_path, monkeypatch):
    """The test split is scored after the last checkpoint: its time is eval time, inside wall_time_s."""
    import time

    from elmjax import train
    from elmjax.run_times import TIME_KEYS
    from train_helpers import tiny_config

    slow = 1.0  # far above what the rest of this run spends evaluating

    def slow_held_out_final(session, params):
        time.sleep(slow)
        return held_out_final(session, params)

    held_out_final = train.held_out_final
    monkeypatch.setattr(train, "held_out_final", slow_held_out_final)
    cfg = tiny_config(tmp_path / "run", "data.test_sequences=8", "train.steps=6", "train.eval_every=6",
                      "checkpoint.enabled=false")
    start = time.perf_counter()
    assert train.run(cfg).state == "done"
    elapsed = time.perf_counter() - start
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["eval_s"] >= slow
    assert sum(final[k] for k in TIME_KEYS) == pytest.approx(final["wall_time_s"])
    assert elapsed - final["wall_time_s"] < slow / 2  # nothing of the run is left outside its wall time
