"""Documented workflows, end to end as a user runs them."""

import json

from elmjax import config_io, data, generate, train
from elmjax.config import Config
from test_tokenizer import train_hf
from train_helpers import tiny_config, write_config


def test_train_on_prepared_bpe_data_records_and_reuses_its_tokenizer(tmp_path, capsys):
    """prepare with a BPE tokenizer -> train with a config that still says 'byte' -> generate uses the BPE."""
    (tmp_path / "tok").mkdir()
    tok_file = train_hf(tmp_path / "tok")
    packed = tmp_path / "packed"
    assert data.main(["prepare", "--tokenizer", f"hf:{tok_file}", "--seq-len", "32", "--max-documents", "150",
                      "--out", str(packed), "--no-progress"]) == 0
    vocab = json.loads((packed / "manifest.json").read_text())["vocab_size"]
    cfg = write_config(tiny_config(tmp_path / "run", "train.steps=2", "checkpoint.every=2"), tmp_path / "c.yaml")
    args = [str(cfg), "data.source=arrayrecord", f"data.paths=[{packed}]"]
    # The byte-sized model is too small for the data's vocabulary: one line saying what to set.
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"model.vocab_size (259) is smaller than the vocabulary of tokenizer 'hf:{packed}" in err
    assert f"set model.vocab_size={vocab}" in err and "Traceback" not in err
    assert train.main([*args, f"model.vocab_size={vocab}"]) == 0
    used = f"hf:{(packed / 'tokenizer.json').resolve()}"
    assert config_io.load(Config, tmp_path / "run" / "config.yaml").data.tokenizer == used
    # What `python -m elmjax.generate --checkpoint RUN` (and evaluate) load: the BPE, not bytes.
    _, tok = generate.load_for_inference(tmp_path / "run")
    assert tok.spec == used and tok.vocab_size == vocab
