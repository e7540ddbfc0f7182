"""A user's mistake is one 'error:' line naming the key or file, with exit 2; never a traceback.

The CLIs are called in-process (``main([...])``) and their stderr is read
with capsys; ``--debug`` shows the traceback of a user error as well.
"""

import json
import logging
import re

import pytest

from elmjax import config_io, evaluate, generate, layout, train
from elmjax.config import Config
from elmjax.errors import UserError
from elmjax.hf_interop import CheckpointError, config_to_hf, from_pretrained
from elmjax.model_config import ModelConfig
from train_helpers import tiny_config, write_config


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def cfg_file(tmp_path):
    return write_config(tiny_config(tmp_path / "run", "train.steps=2"), tmp_path / "c.yaml")


# ------------------------------------------------------------------ python -m elmjax.train

TRAIN_CASES = {
    "missing sentencepiece file": (["data.tokenizer=sentencepiece:{tmp}/nope.model"],
                                   r"tokenizer 'sentencepiece:.*nope\.model': file not found"),
    "missing tokenizer.json": (["data.tokenizer=hf:{tmp}/tokenizer.json"], r"tokenizer 'hf:.*': file not found"),
    "empty corpus": (["data.source=text", "data.paths=[{tmp}/empty.txt]"], "the train split has 0 tokens"),
    "glob matching nothing": (["data.source=text", "data.paths=['{tmp}/none-*.txt']"], "no files match the glob"),
    "wrong JSONL field": (["data.source=jsonl", "data.paths=[{tmp}/docs.jsonl]"],
                          r"docs\.jsonl:1: no text field 'text' \(found \['body'\]\); set data.text_field"),
    "max_documents=0": (["data.max_documents=0"], r"c\.yaml: data: max_documents must be >= 1"),
    "mesh larger than the devices": (["mesh.data=16"], r"mesh: dcn_data\*data\*fsdp\*tensor = 16 but only 8 devices"),
    "steps=.inf": (["train.steps=.inf"], r"c\.yaml: train\.steps: expected an integer or null, got inf"),
    "steps=.nan": (["train.steps=.nan"], r"c\.yaml: train\.steps: expected an integer or null, got nan"),
    "seq_len > max_context_length": (["data.seq_len=64", "model.max_context_length=32"],
                                     r"data\.seq_len \(64\) is longer than model\.max_context_length \(32\)"),
    "non-finite lr": (["optimizer.lr=.inf"], r"optimizer: lr must be a finite number, got inf"),
    "nan lr": (["optimizer.lr=.nan"], r"optimizer: lr must be a finite number, got nan"),
    "negative z_loss": (["optimizer.z_loss=-0.1"], r"optimizer: z_loss must be >= 0, got -0\.1"),
    "negative weight_decay": (["optimizer.weight_decay=-1"], r"optimizer: weight_decay must be >= 0, got -1"),
    "run_dir is a file": (["run_dir={tmp}/empty.txt"], r"run_dir: .*empty\.txt is a file, not a directory"),
}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_train_cli_user_errors_are_one_line(case, cfg_file, tmp_path, capsys):
    overrides, message = TRAIN_CASES[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    rc = train.main([str(cfg_file), *(o.format(tmp=tmp_path) for o in overrides)])
    line = one_error_line(capsys)
    assert rc == 2
    assert re.search(message, line), line


def test_train_cli_debug_shows_the_traceback_of_a_user_error(cfg_file):
    with pytest.raises(UserError, match="mesh"):
        train.main([str(cfg_file), "mesh.data=16", "--debug"])


def test_duplicate_keys_in_a_training_yaml_are_rejected(tmp_path, capsys):
    f = tmp_path / "dup.yaml"
    f.write_text("optimizer:\n  lr: 1.0e-3\n  warmup_steps: 3\n  lr: 1.0\ntrain:\n  steps: 2\n")
    with pytest.raises(config_io.ConfigError, match=r"dup\.yaml: optimizer\.lr: duplicate key \(lines 2 and 4\)"):
        config_io.load(Config, f)
    assert train.main([str(f)]) == 2
    assert "optimizer.lr: duplicate key" in one_error_line(capsys)


# ---------------------------------------------------------- Hugging Face config.json

def write_hf_dir(path, **changes):
    hf = config_to_hf(ModelConfig(num_layers=2, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16),
                      "float32")
    del hf["elmjax"]
    hf.update(changes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"model_dim": "sixty-four"}, r"config\.json: model_dim: expected a positive integer, got 'sixty-four'"),
    ({"vocab_size": None}, r"config\.json: vocab_size: expected a positive integer, got None"),
    ({"num_transformer_layers": -2}, r"config\.json: num_transformer_layers: expected a positive integer, got -2"),
    ({"ffn_with_glu": "yes"}, r"config\.json: ffn_with_glu: expected true/false"),
    ({"ffn_multipliers": ["a", 1]}, r"config\.json: ffn_multipliers: expected a number or a list of numbers"),
    ({"num_kv_heads": 2}, r"config\.json: num_kv_heads: expected a list of positive integers"),
    ({"num_query_heads": [4, 0]}, r"config\.json: num_query_heads: expected a list of positive integers"),
    ({"num_query_heads": [4, 4, 4]}, r"config\.json: .*qkv_multipliers: expected a number, \[min, max\] bounds or 2"),
])
def test_hf_config_with_wrong_values_names_config_json_and_key(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(write_hf_dir(tmp_path / "hf", **changes))


def test_hf_config_elmjax_section_must_agree_with_the_hub_fields(tmp_path):
    from elmjax.hf_interop import save_pretrained
    from elmjax.bench_generate import random_model

    d = save_pretrained(random_model(ModelConfig(num_layers=2, model_dim=64, head_dim=16, num_gqa_groups=2,
                                                 ffn_dim_divisor=16)), tmp_path / "hf")
    hf = json.loads((d / "config.json").read_text())
    hf["model_dim"] = 96
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"config\.json: model_dim 96 disagrees with elmjax\.model_dim 64"):
        from_pretrained(d)


def test_evaluate_and_generate_on_a_bad_hf_config_are_one_line(tmp_path, capsys):
    d = write_hf_dir(tmp_path / "hf", model_dim="sixty-four")
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "a", "choices": [" b", " c"], "gold": 0}) + "\n")
    assert evaluate.main(["--checkpoint", str(d), "--tasks", str(task), "--tokenizer", "byte"]) == 2
    assert "config.json: model_dim: expected a positive integer" in one_error_line(capsys)
    assert generate.main(["--checkpoint", str(d), "--prompt", "x", "--tokenizer", "byte"]) == 2
    assert "config.json: model_dim: expected a positive integer" in one_error_line(capsys)


# ------------------------------------------------------------------ other CLI arguments

def test_evaluate_out_pointing_at_a_directory_fails_before_loading(tmp_path, capsys):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "a", "choices": [" b", " c"], "gold": 0}) + "\n")
    rc = evaluate.main(["--checkpoint", str(tmp_path / "nothing-here"), "--tasks", str(task), "--out", str(tmp_path)])
    assert rc == 2
    assert f"--out {tmp_path}: is a directory" in one_error_line(capsys)


def test_prepare_out_pointing_at_a_file_is_refused_even_with_overwrite(tmp_path, capsys):
    from elmjax import data

    f = tmp_path / "packed"
    f.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--seq-len", "16", "--out", str(f), "--overwrite", "--max-documents", "5",
                   "--no-progress"])
    assert e.value.code == 2
    assert f"--out {f}: is a file" in one_error_line(capsys)
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("cli,argv", [
    (layout.main, ["OpenELM-270M", "--seq-len", "-5"]),
    (evaluate.main, ["--checkpoint", "x", "--tasks", "t.jsonl", "--token-budget", "-1"]),
])
def test_negative_sizes_are_argument_errors(cli, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "must be >= 1" in err and "Traceback" not in err


# ------------------------------------------------------------------ run directories

def test_cli_run_directory_lifecycle(tmp_path, capsys):
    """A setup failure does not poison the run directory; stderr that is not a terminal (SLURM logs,
    pipes, capsys) gets plain progress lines, no tqdm carriage returns, and elmjax's INFO lines such
    as the resume; a different config is refused naming the keys that differ."""
    import shutil

    from elmjax import run_dir as rd

    d = tmp_path / "run"
    cfg = write_config(tiny_config(d, "train.steps=4", "train.log_every=2", "train.eval_every=4",
                                   "checkpoint.every=2", "train.progress=true"), tmp_path / "c.yaml")
    # A mistyped corpus: the attempt fails during setup, before any step.
    assert train.main([str(cfg), "data.source=text", f"data.paths=['{tmp_path}/typo-*.txt']"]) == 2
    assert "no files match the glob" in one_error_line(capsys)
    assert rd.read_status(d)["state"] == "failed"
    # The corrected command works in the same run directory, without rm -rf.
    assert train.main([str(cfg)]) == 0
    err = capsys.readouterr().err
    assert rd.read_status(d)["state"] == "done"
    assert config_io.load(Config, d / "config.yaml").data.source == "stdlib"
    assert "\r" not in err
    assert "elmjax.train: step 2/4  loss" in err and "elmjax.train: step 4/4  loss" in err, err
    # As if killed after the step-2 checkpoint: the rerun resumes, and says so.
    shutil.rmtree(d / "checkpoints" / "4")
    (d / "final.json").unlink()
    rd.write_status(d, "running", total_steps=4)
    assert train.main([str(cfg)]) == 0
    err = capsys.readouterr().err
    assert f"resumed {d} from step 2" in err, err
    assert "\r" not in err
    # Only elmjax's own INFO lines are made visible, not orbax/absl chatter.
    assert all("elmjax" in line for line in err.splitlines() if " INFO" in line or line.startswith("I")), err
    # Now that checkpoints exist, a different config is refused, naming what differs.
    assert train.main([str(cfg), "optimizer.lr=0.01", "data.seed=3"]) == 2
    line = one_error_line(capsys)
    assert "different config (data.seed: 0 -> 3, optimizer.lr: 0.003 -> 0.01)" in line, line
    # main() leaves the logging set-up as it found it (in-process callers, pytest's caplog).
    assert logging.getLogger("elmjax").propagate and not logging.getLogger("elmjax").handlers


def test_differences_lists_a_few_dotted_keys():
    old = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": 1, "f": 1}
    new = {"a": {"b": 2, "c": [1, 2]}, "d": "y", "e": 2, "f": 2, "g": 0}
    assert config_io.differences(old, new, limit=2) == "a.b: 1 -> 2, d: 'x' -> 'y' (and 3 more)"
    assert config_io.differences(old, old) == ""
