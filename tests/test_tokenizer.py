"""Tokenizers: byte-level ids, file-backed kinds (when their libraries are installed), clear errors."""

import json
import random
import sys

import numpy as np
import pytest

from elmjax.model_config import ModelConfig
from elmjax.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer

TEXT = "def f(x):\n    return x  # héllo wörld, 日本語 ✓\n"


def test_byte_tokenizer_ids_are_utf8_bytes_and_roundtrip():
    tok = load_tokenizer("byte")
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (259, 256, 257, 258)
    # The model's default embedding table must cover the default tokenizer exactly.
    assert ModelConfig().vocab_size == tok.vocab_size


def test_byte_tokenizer_encode_many_matches_encode_as_int32():
    tok = ByteTokenizer()
    arrays = tok.encode_many(["abc", "", TEXT])
    assert [a.dtype for a in arrays] == [np.int32] * 3
    assert [a.tolist() for a in arrays] == [tok.encode("abc"), [], tok.encode(TEXT)]


def test_byte_decode_drops_specials_and_replaces_cut_characters():
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode("ab") + [tok.eos_id, tok.pad_id] + tok.encode("é")[:1]
    # Specials carry no text; a multi-byte character cut in half becomes U+FFFD instead of raising.
    assert tok.decode(ids) == "ab\ufffd"
    with pytest.raises(ValueError, match="259"):
        tok.decode([300])


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'gpt2'.*byte.*sentencepiece:PATH.*hf:PATH"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece:x'"):
        load_tokenizer("wordpiece:x")


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="file not found: .*nope.model"):
        load_tokenizer(f"sentencepiece:{missing}")
    with pytest.raises(ValueError, match="missing the file path"):
        load_tokenizer("hf:")


@pytest.mark.parametrize("kind,module", [("sentencepiece", "sentencepiece"), ("hf", "tokenizers")])
def test_missing_library_names_the_pip_extra(tmp_path, monkeypatch, kind, module):
    f = tmp_path / "tok.bin"
    f.write_bytes(b"x")
    # A None entry in sys.modules makes the import fail exactly as if the library were absent.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"'{module}'.*pip install 'elmjax\[tokenizers\]'"):
        load_tokenizer(f"{kind}:{f}")


def _corpus_lines(n=300):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "héllo", "wörld", "return", "def"]
    return [" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)]


def train_sentencepiece(tmp_path, eos_id=1):
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_prefix=str(prefix), vocab_size=48, model_type="bpe",
        unk_id=0, eos_id=eos_id, bos_id=-1, pad_id=-1, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def train_hf(tmp_path, special="<|endoftext|>"):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_sentencepiece_roundtrip_and_eos(tmp_path):
    path = train_sentencepiece(tmp_path)
    tok = load_tokenizer(f"sentencepiece:{path}")
    text = "alpha gamma héllo"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 48 and tok.eos_id == 1
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert [a.tolist() for a in tok.encode_many([text, "beta"])] == [ids, tok.encode("beta")]


def test_sentencepiece_without_eos_is_refused(tmp_path):
    path = train_sentencepiece(tmp_path, eos_id=-1)
    with pytest.raises(ValueError, match="no EOS piece"):
        load_tokenizer(f"sentencepiece:{path}")


def test_hf_tokenizer_roundtrip_and_eos(tmp_path):
    path = train_hf(tmp_path)
    tok = load_tokenizer(f"hf:{path}")
    text = "def alpha(wörld): return 日本"  # unseen characters still round-trip via byte-level BPE
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    vocab = json.loads(path.read_text())["model"]["vocab"]
    assert tok.eos_id == vocab["<|endoftext|>"] and tok.eos_id not in ids
    assert tok.vocab_size == max(vocab.values()) + 1
    assert [a.tolist() for a in tok.encode_many([text])] == [ids]


def test_hf_eos_from_tokenizer_config_and_missing_eos(tmp_path):
    path = train_hf(tmp_path, special="<stop>")
    # No well-known EOS spelling: refused with a message saying what was tried.
    with pytest.raises(ValueError, match="no end-of-text token"):
        load_tokenizer(f"hf:{path}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<stop>"}))
    tok = load_tokenizer(f"hf:{path}")
    assert tok.eos_id == json.loads(path.read_text())["model"]["vocab"]["<stop>"]


def test_hf_bad_json_names_the_file(tmp_path):
    pytest.importorskip("tokenizers")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(f"hf:{bad}")
