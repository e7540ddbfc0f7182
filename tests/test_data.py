"""Data pipeline: sources, split, packing, shuffling, host sharding, resumable state, prepare."""

import json
from collections import Counter
import subprocess
import sys
import time

import numpy as np
import pytest

from elmjax import data
from elmjax.config import DataConfig
from elmjax.corpus import (
    STDLIB_SKIP_DIRS, DataError, concat_with_eos, is_validation, iter_documents, pack, row_target_bytes, stdlib_files,
    token_bytes,
)
from elmjax.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id


def _docs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "return", "def", "日本", "x = 1"]
    # Each document carries a unique marker so leaks across the split can be searched for.
    return [f"@@{i:04d}@@ " + " ".join(rng.choice(words, size=int(rng.integers(5, 30)))) for i in range(n)]


def _write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture
def corpus(tmp_path):
    texts = _docs()
    _write_jsonl(tmp_path / "a.jsonl", texts[:120])
    _write_jsonl(tmp_path / "b.jsonl", texts[120:])
    cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "*.jsonl"),), seq_len=16, batch_size=8,
                     val_fraction=0.2, val_sequences=4, seed=3)
    return cfg, texts


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- sources and split


def test_stdlib_files_sorted_without_tests_or_site_packages():
    files = stdlib_files()
    rels = [r for r, _ in files]
    assert rels == sorted(rels) and len(rels) > 100
    assert not any(set(r.split("/")[:-1]) & STDLIB_SKIP_DIRS for r in rels)
    assert "json/decoder.py" in rels and all(r.endswith(".py") for r in rels)


def test_stdlib_split_depends_only_on_the_relative_path():
    full = {d.split_key: is_validation(d.split_key, 0.05) for d in iter_documents("stdlib", ())}
    few = list(iter_documents("stdlib", (), max_documents=60))
    assert len(few) == 60
    # Capping (or adding) files never moves a file across the split.
    assert all(is_validation(d.split_key, 0.05) == full[d.split_key] for d in few)
    frac = sum(full.values()) / len(full)
    assert 0.02 < frac < 0.10, frac


def test_split_never_leaks_validation_documents_into_train(corpus):
    cfg, texts = corpus
    streams = data._in_memory_streams(cfg)
    tok = ByteTokenizer()
    train_text, val_text = tok.decode(streams.train), tok.decode(streams.val)
    in_val = [t for t in texts if is_validation(t, cfg.val_fraction)]
    assert 0 < len(in_val) < len(texts)
    for t in texts:
        marker = t[:8]
        assert (marker in val_text) == (t in in_val) and (marker in train_text) == (t not in in_val)


def test_duplicate_documents_share_a_split(tmp_path):
    texts = _docs(60)
    _write_jsonl(tmp_path / "a.jsonl", texts)
    _write_jsonl(tmp_path / "b.jsonl", texts[::-1])
    docs = list(iter_documents("jsonl", (str(tmp_path / "*.jsonl"),)))
    sides = {}
    for d in docs:
        sides.setdefault(d.text, set()).add(is_validation(d.split_key, 0.3))
    assert all(len(s) == 1 for s in sides.values())


def test_parquet_gives_the_same_documents_as_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = _docs(50)
    _write_jsonl(tmp_path / "c.jsonl", texts, field="body")
    pq.write_table(pa.table({"body": texts, "n": list(range(50))}), tmp_path / "c.parquet", row_group_size=7)
    from_jsonl = [d.text for d in iter_documents("jsonl", (str(tmp_path / "c.jsonl"),), "body")]
    from_parquet = [d.text for d in iter_documents("parquet", (str(tmp_path / "c.parquet"),), "body")]
    assert from_parquet == from_jsonl == texts
    with pytest.raises(DataError, match=r"c\.parquet: no column 'text'.*body"):
        list(iter_documents("parquet", (str(tmp_path / "c.parquet"),), "text"))


def test_text_files_are_documents_and_max_documents_caps(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"file {i}\n")
    (tmp_path / "empty.txt").write_text("")
    docs = list(iter_documents("text", (str(tmp_path / "*.txt"),)))
    assert [d.text for d in docs] == [f"file {i}\n" for i in range(5)]  # sorted, empty skipped
    assert len(list(iter_documents("text", (str(tmp_path / "*.txt"),), max_documents=2))) == 2


def test_bad_inputs_name_the_file_line_and_field(tmp_path):
    with pytest.raises(DataError, match=r"no files match the glob '.*nothing-\*\.jsonl'"):
        list(iter_documents("jsonl", (str(tmp_path / "nothing-*.jsonl"),)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        list(iter_documents("jsonl", (str(bad),)))
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no text field 'text'.*body"):
        list(iter_documents("jsonl", (str(bad),)))
    bad.write_text('{"text": "ok"}\n{"text": "half a pair \\ud800"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: text is not valid Unicode"):
        list(iter_documents("jsonl", (str(bad),)))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        list(iter_documents("text", (str(tmp_path / "latin1.txt"),)))
    with pytest.raises(DataError, match="data.paths is not used with data.source 'stdlib'"):
        list(iter_documents("stdlib", ("x.txt",)))


# ---------------------------------------------------------------- packing


def test_packing_puts_eos_after_each_document_and_covers_every_target_once():
    tok = ByteTokenizer()
    texts = ["héllo", "ab", "", "xyz!"]
    docs = tok.encode_many(texts)
    tokens = concat_with_eos(docs, EOS)
    weights = token_bytes([len(d) for d in docs], [len(t.encode()) for t in texts])
    assert tokens.tolist() == list(b"h\xc3\xa9llo") + [EOS] + list(b"ab") + [EOS, EOS] + list(b"xyz!") + [EOS]
    assert weights.sum() == sum(len(t.encode()) for t in texts) and (weights[tokens == EOS] == 0).all()
    rows = pack(tokens, 4)
    assert rows.shape == ((len(tokens) - 1) // 4, 5) and not rows.flags.writeable
    # Stride seq_len: row i's last token is row i+1's first, so targets tile the stream exactly.
    assert (rows[:-1, -1] == rows[1:, 0]).all()
    assert np.concatenate([rows[0, :1]] + [r[1:] for r in rows]).tolist() == tokens[: len(rows) * 4 + 1].tolist()
    # Byte tokenizer: the bytes behind a row's targets are its non-special targets.
    assert row_target_bytes(weights, 4, len(rows)).tolist() == (rows[:, 1:] < 256).sum(1).tolist()


def test_subword_bytes_are_spread_over_document_tokens():
    assert concat_with_eos([np.array([5, 6, 7], np.int32), np.array([9], np.int32)], 1).tolist() == [5, 6, 7, 1, 9, 1]
    assert token_bytes([3, 1, 0], [6, 4, 0]).tolist() == [2, 2, 2, 0, 4, 0, 0]


# ---------------------------------------------------------------- training iterator


def test_same_seed_same_batches_other_seed_other_batches(corpus):
    cfg, _ = corpus
    a, b = _take(data.train_iterator(cfg), 5), _take(data.train_iterator(cfg), 5)
    assert all(x.dtype == np.int32 and x.shape == (8, 17) for x in a)
    assert [data.batch_fingerprint(x) for x in a] == [data.batch_fingerprint(x) for x in b]
    c = _take(data.train_iterator(DataConfig(**{**cfg.__dict__, "seed": 4})), 5)
    assert [data.batch_fingerprint(x) for x in a] != [data.batch_fingerprint(x) for x in c]


def test_each_epoch_is_a_new_permutation_of_all_rows(corpus):
    cfg, _ = corpus
    table = pack(data._in_memory_streams(cfg).train, cfg.seq_len)
    n = len(table)
    steps = -(-2 * n // cfg.batch_size)
    seen = np.concatenate(_take(data.train_iterator(cfg), steps))[: 2 * n]
    rows = [r.tobytes() for r in table]
    e1, e2 = [r.tobytes() for r in seen[:n]], [r.tobytes() for r in seen[n:]]
    # Every row exactly once per epoch (as a multiset: short rows can repeat), in a new order each epoch.
    assert Counter(e1) == Counter(e2) == Counter(rows)
    assert e1 != e2 and e1 != rows


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_rows_union_to_the_global_batch(corpus, hosts):
    cfg, _ = corpus
    global_batches = _take(data.train_iterator(cfg), 6)
    local = [_take(data.train_iterator(cfg, process_index=p, process_count=hosts), 6) for p in range(hosts)]
    for step, g in enumerate(global_batches):
        assert local[0][step].shape == (cfg.batch_size // hosts, cfg.seq_len + 1)
        np.testing.assert_array_equal(np.concatenate([local[p][step] for p in range(hosts)]), g)
    with pytest.raises(ValueError, match="not divisible"):
        data.train_iterator(cfg, process_index=0, process_count=3)


def test_restored_state_continues_with_exactly_the_same_batches(corpus):
    cfg, _ = corpus
    it = data.train_iterator(cfg)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, 5)
    fresh = data.train_iterator(cfg)
    fresh.set_state(state)
    for x, y in zip(_take(fresh, 5), expected):
        np.testing.assert_array_equal(x, y)
    # The state is the global step: a host of a 2-host run resumes with its half of the same batches.
    host1 = data.train_iterator(cfg, process_index=1, process_count=2)
    host1.set_state(state)
    np.testing.assert_array_equal(next(host1), expected[0][4:])


def test_state_from_other_data_is_refused(corpus):
    cfg, _ = corpus
    state = data.train_iterator(cfg).get_state()
    other = data.train_iterator(DataConfig(**{**cfg.__dict__, "seed": 9}))
    with pytest.raises(DataError, match="seed"):
        other.set_state(state)


def test_tokenization_is_cached_across_train_and_validation(corpus):
    cfg, _ = corpus
    data._cached_streams.cache_clear()
    data.train_iterator(cfg)
    data.validation_set(cfg)
    data.train_iterator(DataConfig(**{**cfg.__dict__, "batch_size": 4, "seed": 1}))
    assert data._cached_streams.cache_info().misses == 1


# ---------------------------------------------------------------- validation set


def test_validation_set_is_fixed_frozen_and_counts_bytes(corpus):
    cfg, _ = corpus
    cfg = DataConfig(**{**cfg.__dict__, "val_sequences": 40})
    v = data.validation_set(cfg)
    w = data.validation_set(DataConfig(**{**cfg.__dict__, "batch_size": 2, "seed": 11}))
    np.testing.assert_array_equal(v.tokens, w.tokens)
    assert v.tokens.shape == (40, 17) and v.tokens.dtype == np.int32
    with pytest.raises(ValueError):
        v.tokens[0, 0] = 1
    targets = v.tokens[:, 1:]
    assert v.row_bytes.tolist() == (targets < 256).sum(1).tolist()
    assert v.bytes_per_token == pytest.approx((targets < 256).mean())
    assert 0.8 < v.bytes_per_token < 1.0  # EOS targets carry no bytes


def test_too_small_corpus_says_tokens_found_and_needed(tmp_path):
    _write_jsonl(tmp_path / "t.jsonl", _docs(40))
    cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "t.jsonl"),), seq_len=64, batch_size=64, val_sequences=1,
                     val_fraction=0.2)
    with pytest.raises(DataError, match=r"train split has \d+ tokens but one batch of 64 needs 4097"):
        data.train_iterator(cfg)
    with pytest.raises(DataError, match=r"validation split has \d+ tokens but data.val_sequences needs 6401"):
        data.validation_set(DataConfig(**{**cfg.__dict__, "val_sequences": 100}))


def test_stdlib_default_config_starts_fast():
    cfg = DataConfig()
    t = time.perf_counter()
    batch = next(data.train_iterator(cfg))
    v = data.validation_set(cfg)
    elapsed = time.perf_counter() - t
    assert batch.shape == (8, 129) and v.tokens.shape == (32, 129)
    assert elapsed < 15, f"stdlib corpus took {elapsed:.1f}s to tokenize"
    assert data.vocab_size(cfg) == 259


# ---------------------------------------------------------------- batch fingerprint


def test_batch_fingerprint_tracks_values_and_shape_only():
    x = np.arange(24, dtype=np.int32).reshape(4, 6)
    fp = data.batch_fingerprint(x)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert data.batch_fingerprint(x.astype(np.int64)) == fp == data.batch_fingerprint(x.copy())
    y = x.copy()
    y[3, 5] += 1
    assert data.batch_fingerprint(y) != fp
    assert data.batch_fingerprint(x.reshape(6, 4)) != fp


# ---------------------------------------------------------------- prepare / arrayrecord


def test_prepared_arrayrecord_gives_the_in_memory_rows(corpus, tmp_path, monkeypatch):
    cfg, _ = corpus
    # Tiny flushes and shards exercise the carry between flushes and shard rotation.
    monkeypatch.setattr(data._ShardWriter, "_FLUSH_TOKENS", 97)
    out = tmp_path / "packed"
    m = data.prepare(cfg, out, shard_size=100, progress=False)
    assert len(m["splits"]["train"]["shards"]) > 1 and m["seq_len"] == 16 and m["vocab_size"] == 259
    assert json.loads((out / "manifest.json").read_text()) == m
    ar = DataConfig(**{**cfg.__dict__, "source": "arrayrecord", "paths": (str(out),)})
    mem_val, ar_val = data.validation_set(cfg), data.validation_set(ar)
    np.testing.assert_array_equal(mem_val.tokens, ar_val.tokens)
    np.testing.assert_allclose(mem_val.row_bytes, ar_val.row_bytes)
    assert mem_val.bytes_per_token == pytest.approx(ar_val.bytes_per_token)
    mem_it, ar_it = data.train_iterator(cfg), data.train_iterator(ar)
    for x, y in zip(_take(mem_it, 4), _take(ar_it, 4)):
        np.testing.assert_array_equal(x, y)
        assert y.dtype == np.int32
    assert m["splits"]["train"]["rows"] == len(pack(data._in_memory_streams(cfg).train, 16))
    assert data.vocab_size(ar) == 259


def test_arrayrecord_state_restore(corpus, tmp_path):
    cfg, _ = corpus
    out = tmp_path / "packed"
    data.prepare(cfg, out, progress=False)
    ar = DataConfig(**{**cfg.__dict__, "source": "arrayrecord", "paths": (str(out / "manifest.json"),)})
    it = data.train_iterator(ar)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = data.train_iterator(ar)
    fresh.set_state(state)
    for x, y in zip(_take(fresh, 3), expected):
        np.testing.assert_array_equal(x, y)


def test_arrayrecord_seq_len_mismatch_and_missing_manifest(corpus, tmp_path):
    cfg, _ = corpus
    out = tmp_path / "packed"
    data.prepare(cfg, out, progress=False)
    wrong = DataConfig(source="arrayrecord", paths=(str(out),), seq_len=32)
    with pytest.raises(DataError, match=r"manifest.json: the data was packed with seq_len 16 but data.seq_len is 32"):
        data.validation_set(wrong)
    with pytest.raises(DataError, match="no manifest.json"):
        data.train_iterator(DataConfig(source="arrayrecord", paths=(str(tmp_path),), seq_len=16))


def test_prepare_is_atomic_and_refuses_to_clobber(tmp_path):
    (tmp_path / "src").mkdir()
    _write_jsonl(tmp_path / "src" / "a.jsonl", _docs(80))
    (tmp_path / "src" / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "src" / "*.jsonl"),), seq_len=8)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b\.jsonl:2"):
        data.prepare(cfg, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp dir left behind
    (tmp_path / "src" / "b.jsonl").unlink()
    data.prepare(cfg, out, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        data.prepare(cfg, out, progress=False)
    short = DataConfig(**{**cfg.__dict__, "seq_len": 4})
    assert data.prepare(short, out, overwrite=True, progress=False)["seq_len"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 4


def test_prepare_cli(tmp_path, capsys):
    _write_jsonl(tmp_path / "a.jsonl", _docs(100), field="body")
    out = tmp_path / "out"
    args = ["prepare", "--source", "jsonl", "--paths", str(tmp_path / "*.jsonl"), "--text-field", "body",
            "--seq-len", "32", "--out", str(out), "--no-progress"]
    assert data.main(args) == 0
    assert "validation bytes/token" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["text_field"] == "body" and m["splits"]["validation"]["rows"] > 0
    with pytest.raises(SystemExit) as e:
        data.main(args[:3] + [str(tmp_path / "none-*.jsonl")] + args[4:])
    assert e.value.code == 2 and "none-*.jsonl" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", _docs(200))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "elmjax.data", "prepare", "--source", "jsonl", "--paths",
                           str(tmp_path / "a.jsonl"), "--seq-len", "16", "--val-fraction", "0.2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").is_file() and list((out / "train").glob("*.array_record"))


# ---------------------------------------------------------------- file-backed tokenizers in the pipeline


def test_hf_tokenizer_pipeline_uses_its_eos_and_vocab(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_docs(100), trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    cfg, _ = corpus
    cfg = DataConfig(**{**cfg.__dict__, "tokenizer": f"hf:{path}"})
    vocab = data.vocab_size(cfg)
    batch = next(data.train_iterator(cfg))
    eos = json.loads(path.read_text())["model"]["vocab"]["<|endoftext|>"]
    assert batch.max() < vocab and (batch == eos).any()
    v = data.validation_set(cfg)
    assert v.bytes_per_token > 1.2  # BPE tokens stand for several bytes each


def test_tokenizing_and_validation_do_not_import_jax():
    # grain imports JAX, so it must only be imported when a training iterator is built.
    code = (
        "import sys; from elmjax import data; from elmjax.config import DataConfig; "
        "v = data.validation_set(DataConfig(seq_len=16, val_sequences=2, max_documents=200)); "
        "assert v.tokens.shape == (2, 17); "
        "print(sorted(m for m in ('jax', 'grain') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_prepare_keeps_the_tokenizer_with_the_data_and_a_mismatch_warns_once_truthfully(corpus, tmp_path):
    import warnings

    from test_tokenizer import train_hf

    (tmp_path / "tok_src").mkdir()
    tok_file = train_hf(tmp_path / "tok_src")
    cfg, _ = corpus
    cfg = DataConfig(**{**cfg.__dict__, "tokenizer": f"hf:{tok_file}"})
    m = data.prepare(cfg, tmp_path / "packed", progress=False)
    assert m["tokenizer_file"] == "tokenizer.json"
    assert (tmp_path / "packed" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    copy = f"hf:{(tmp_path / 'packed' / 'tokenizer.json').resolve()}"
    # A config still saying 'byte' (e.g. tiny_cpu.yaml): the data's tokenizer is what is used, said once.
    ar = DataConfig(**{**cfg.__dict__, "source": "arrayrecord", "paths": (str(tmp_path / "packed"),),
                       "tokenizer": "byte"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert data.tokenizer_spec(ar) == copy
        assert data.vocab_size(ar) == m["vocab_size"] > 259
        data.validation_set(ar)
        next(data.train_iterator(ar))
    messages = [str(w.message) for w in caught if "data.tokenizer" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"'{copy}' is the tokenizer used" in messages[0]
    # Once the config names the data's tokenizer (as the run's config.yaml will), no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.validation_set(DataConfig(**{**ar.__dict__, "tokenizer": copy}))
