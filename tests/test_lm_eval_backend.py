import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from elmjax.evaluate import evaluate_tasks  # noqa: E402
from elmjax.generate import generate  # noqa: E402
from elmjax.hf_interop import save_pretrained  # noqa: E402
from elmjax.lm_eval_backend import ElmjaxLM  # noqa: E402
from elmjax.bench_generate import random_model  # noqa: E402
from elmjax.model_config import ModelConfig  # noqa: E402
from elmjax.scoring import loglikelihood_rolling, rolling_windows  # noqa: E402
from elmjax.tokenizer import ByteTokenizer  # noqa: E402

TINY = ModelConfig(num_layers=2, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, max_context_length=64)

QUESTIONS = [
    {"context": "The sky is", "choices": [" blue", " green", " a"], "gold": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 22", " four"], "gold": 2},
    {"context": "Cats say", "choices": [" meow", " woof"], "gold": 0},
    {"context": "Water is ", "choices": ["wet", "dry as a bone"], "gold": 1},
    {"context": "Ice is", "choices": [" cold", " hot"], "gold": 0},
    {"context": "One, two,", "choices": [" three", " five", " ten"], "gold": 0},
    {"context": "Fish live in", "choices": [" water", " trees"], "gold": 0},
]

TASK_YAML = """\
task: elmjax_mini
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


@pytest.fixture(scope="module")
def model():
    return random_model(TINY)


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "elmjax_mini.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "elmjax_mini.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "hf_cache"))
    return tmp_path


def _check_equal(harness: dict, ours: dict):
    assert harness["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert harness["acc_stderr,none"] == pytest.approx(ours["acc_stderr"], abs=1e-9)
    # The harness normalises acc_norm by characters and acc_bytes by bytes; ASCII data: both are ours.
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)
    assert harness["acc_bytes,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)


def test_harness_multiple_choice_equals_elmjax_evaluate(model, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = ElmjaxLM(model=model, tokenizer=ByteTokenizer())
    # include_defaults=False: indexing the harness's thousands of built-in task files takes ~10 s.
    manager = TaskManager(include_path=str(task_dir / "tasks"), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["elmjax_mini"], task_manager=manager)
    ours = evaluate_tasks(model, ByteTokenizer(), [task_dir / "elmjax_mini.jsonl"])["elmjax_mini"]
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # not a degenerate all-or-nothing case
    _check_equal(out["results"]["elmjax_mini"], ours)


def test_model_type_is_registered_and_built_from_model_args(model, tmp_path):
    from lm_eval.api.registry import get_model

    import elmjax.lm_eval_cli  # noqa: F401  (what the wrapper imports before lm_eval's CLI)

    save_pretrained(model, tmp_path / "ckpt")
    cls = get_model("elmjax")
    assert cls is ElmjaxLM
    # What `--model elmjax --model_args ... --batch_size 8` makes:
    lm = cls.create_from_arg_string(f"checkpoint={tmp_path / 'ckpt'},tokenizer=byte,max_gen_toks=7",
                                    {"batch_size": 8, "max_batch_size": None, "device": "cpu"})
    assert (lm.gen_batch, lm.max_gen_toks, lm.max_length, lm.tok.spec) == (8, 7, 64, "byte")
    with pytest.raises(ValueError, match="checkpoint=PATH"):
        cls.create_from_arg_string("", {})
    with pytest.raises(TypeError, match="tokenzier"):
        cls.create_from_arg_string(f"checkpoint={tmp_path / 'ckpt'},tokenzier=byte", {})


@pytest.mark.slow  # the CLI indexes all of the harness's built-in tasks (~10-20 s)
def test_cli_wrapper_runs_a_local_task(model, task_dir, capsys):
    from elmjax.lm_eval_cli import main

    save_pretrained(model, task_dir / "ckpt")
    main(["--model", "elmjax", "--model_args", f"checkpoint={task_dir / 'ckpt'},tokenizer=byte",
          "--include_path", str(task_dir / "tasks"), "--tasks", "elmjax_mini", "--output_path", str(task_dir / "out")])
    (result_file,) = (task_dir / "out").rglob("results_*.json")
    harness = json.loads(result_file.read_text())["results"]["elmjax_mini"]
    _check_equal(harness, evaluate_tasks(model, ByteTokenizer(), [task_dir / "elmjax_mini.jsonl"])["elmjax_mini"])
    assert "elmjax_mini" in capsys.readouterr().out


def test_loglikelihood_rolling_and_generate_until(model):
    lm = ElmjaxLM(model=model, tokenizer="byte", batch_size=4, max_gen_toks=12)
    text = "A long document, scored in windows of max_length tokens. " * 3
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = list(text.encode())
    assert len(rolling_windows(ids, 256, 64)) == 3
    assert ll == pytest.approx(loglikelihood_rolling(model, [ids], 256, max_length=64)[0]) and ll < 0

    prompts = ["Hello", "The answer is", "x"]
    full = [ByteTokenizer().decode(o) for o in generate(model, [list(p.encode()) for p in prompts], 12, stop_tokens=[256])]
    until = full[0][3]  # a character that first appears mid-generation cuts row 0 there
    reqs = [Instance("generate_until", {}, (p, {"until": [until], "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs)
    assert got == [f[: f.index(until)] if until in f else f for f in full]
    assert got[0] == full[0][: full[0].index(until)] and len(got[0]) <= 3
