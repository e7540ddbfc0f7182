import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax.bench_generate import random_model
from elmjax.model_config import ModelConfig
from elmjax.scoring import (_score_batch, choice_metrics, encode_pair, loglikelihood, loglikelihood_rolling, mean_stderr,
                            rolling_windows)
from compile_log import compilations
from elmjax.tokenizer import ByteTokenizer

TINY = ModelConfig(num_layers=2, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, max_context_length=64)


@pytest.fixture(scope="module")
def model():
    return random_model(TINY)


@nnx.jit
def _logp(model, tokens):
    return jax.nn.log_softmax(model(tokens), axis=-1)


def _logp_of(model, seq):
    """Log-probabilities after each token of ``seq`` (one row; right zeros beyond it change nothing by causality,
    and a fixed width compiles once)."""
    padded = np.zeros((1, 128), np.int32)
    padded[0, : len(seq)] = seq
    return np.asarray(_logp(model, jnp.asarray(padded)))[0, : len(seq)]


def naive(model, ctx, cont):
    """Unbatched reference: one forward pass over context + continuation, summed by hand."""
    seq = list(ctx) + list(cont)
    logp = _logp_of(model, seq[:-1])
    pos = np.arange(len(ctx) - 1, len(seq) - 1)
    return float(logp[pos, np.asarray(seq)[pos + 1]].sum()), bool((logp[pos].argmax(-1) == np.asarray(seq)[pos + 1]).all())


def _requests(seed, n):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 259, rng.integers(1, 40)).tolist(), rng.integers(0, 259, rng.integers(1, 12)).tolist())
            for _ in range(n)]


def test_batched_padded_loglikelihood_equals_unpadded_reference(model):
    reqs = _requests(0, 9)
    got = loglikelihood(model, reqs, token_budget=64)  # small budget: several batches per bucket
    for (ctx, cont), res in zip(reqs, got):
        ref, _ = naive(model, ctx, cont)
        assert res.logprob == pytest.approx(ref, abs=2e-4, rel=1e-5)
        assert res.logprob < 0


def test_is_greedy_flags_the_argmax_continuation(model):
    ctx = [5, 6, 7, 8]
    seq = list(ctx)
    for _ in range(4):  # greedy continuation by the reference
        logp = _logp_of(model, seq)[-1]
        seq.append(int(logp.argmax()))
    greedy_cont = seq[len(ctx):]
    other = greedy_cont[:2] + [(greedy_cont[2] + 1) % 259] + greedy_cont[3:]
    res = loglikelihood(model, [(ctx, greedy_cont), (ctx, other), (ctx, [])])
    assert [r.is_greedy for r in res] == [True, False, True]
    assert res[0].logprob > res[1].logprob and res[2].logprob == 0.0


def test_one_compilation_per_length_bucket(model):
    reqs = [([1] * n, [2, 3]) for n in (3, 5, 20, 30)]  # inputs 4, 6 -> bucket 8; 21, 31 -> bucket 32
    _score_batch.clear_cache()
    with compilations("_score_batch") as compiled:
        loglikelihood(model, reqs, token_budget=256)
        assert len(compiled) == 2
        loglikelihood(model, [([4] * n, [5]) for n in (2, 7, 17, 25, 31)], token_budget=256)
        assert len(compiled) == 2  # same buckets, other lengths and counts: no recompilation


def test_long_inputs_keep_the_last_max_length_tokens(model):
    ctx, cont = list(range(1, 81)), [7, 9, 11]
    (res,) = loglikelihood(model, [(ctx, cont)])
    kept = (ctx + cont)[-65:]
    ref, _ = naive(model, kept[:-3], kept[-3:])
    assert res.logprob == pytest.approx(ref, abs=2e-4, rel=1e-5)
    with pytest.raises(ValueError, match="empty context"):
        loglikelihood(model, [([], [1])])
    with pytest.raises(ValueError, match="more than max_length 64"):
        loglikelihood(model, [([1], [2] * 65)])


def test_rolling_windows_match_the_harness_algorithm():
    toks, P = list(range(10)), 99
    assert rolling_windows(toks, P, 4, 1) == [([P], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows(toks, P, 4, 2) == [([P], [0, 1, 2, 3]), ([2, 3], [4, 5, 6]), ([5, 6], [7, 8, 9])]
    assert rolling_windows([], P, 4) == []
    for n, m, c in [(1, 4, 1), (37, 8, 1), (37, 8, 3), (64, 8, 8)]:
        wins = rolling_windows(list(range(n)), P, m, c)
        assert [t for _, pred in wins for t in pred] == list(range(n))  # every token predicted once, in order
        assert all(len(ctx) + len(pred) <= m + 1 and ctx for ctx, pred in wins)


def test_rolling_windows_equal_lm_evals():
    utils = pytest.importorskip("lm_eval.utils")
    for n, m, c in [(37, 8, 1), (37, 8, 3), (5, 8, 1)]:
        ref = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(list(range(n)), 99, m, c)]
        assert rolling_windows(list(range(n)), 99, m, c) == [tuple(w) for w in ref]


def test_rolling_loglikelihood_of_a_short_document_is_its_full_loglikelihood(model):
    doc = list(range(30, 70))
    (total,) = loglikelihood_rolling(model, [doc], prefix_token=256)
    ref, _ = naive(model, [256], doc)
    assert total == pytest.approx(ref, abs=5e-4, rel=1e-5)
    # A long document is scored in windows: the total sums them.
    long_doc = list(range(150))
    totals = loglikelihood_rolling(model, [doc, long_doc, []], prefix_token=256)
    windows = rolling_windows(long_doc, 256, 64)
    assert totals[1] == pytest.approx(sum(naive(model, c, p)[0] for c, p in windows), abs=2e-3, rel=1e-5)
    assert totals[0] == pytest.approx(total, abs=1e-5) and totals[2] == 0.0


def test_encode_pair_moves_trailing_spaces_and_uses_a_prefix_for_empty_context():
    tok = ByteTokenizer()
    assert encode_pair(tok, "Q: ", "yes") == (list(b"Q:"), list(b" yes"))
    assert encode_pair(tok, "", "ab") == ([256], list(b"ab"))
    assert encode_pair(tok, "", "ab", prefix_token=257) == ([257], list(b"ab"))


def test_choice_metrics_normalise_by_utf8_bytes():
    # Raw log-likelihood prefers the short choice; per byte the long one wins.
    assert choice_metrics([-5.0, -6.0], ["ab", "abcdef"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert choice_metrics([-5.0, -6.0], ["ab", "abcdef"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    # "é" is two bytes: -3/2 beats -2/1.
    assert choice_metrics([-2.0, -3.0], ["a", "é"], gold=1)["acc_norm"] == 1.0


def test_mean_stderr():
    x = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, se = mean_stderr(x)
    assert mean == 0.6 and se == pytest.approx(np.std(x, ddof=1) / math.sqrt(5))
    assert math.isnan(mean_stderr([1.0])[1])
