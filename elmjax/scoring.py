"""Log-likelihood scoring: what zero-shot multiple-choice tasks and perplexity need.

Follows the LM Evaluation Harness protocol so numbers are comparable with
published ones:

- ``encode_pair`` tokenizes a (context, continuation) pair the way the
  harness's causal models do: trailing spaces of the context move to the
  continuation, the whole string is encoded and split after the context's
  tokens; an empty context becomes one prefix token.
- ``loglikelihood`` scores token requests: the input is the last
  ``max_length + 1`` tokens of context + continuation, minus the last; the
  result is the summed log-probability of the continuation and whether it is
  the greedy (argmax) continuation. Requests are right-padded to power-of-two
  length buckets, a fixed number of rows per bucket, so each bucket compiles
  once whatever the mix of lengths.
- ``rolling_windows`` / ``loglikelihood_rolling`` give a document's total
  log-likelihood in windows of ``max_length`` tokens (the harness's
  ``get_rolling_token_windows`` + ``make_disjoint_window``), for perplexity.
- ``choice_metrics`` gives ``acc`` and ``acc_norm`` for one multiple-choice
  question; ``acc_norm`` divides each choice's log-likelihood by the UTF-8
  byte length of its text (the harness divides by characters for ``acc_norm``
  and by bytes for ``acc_bytes``: identical for ASCII text).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from elmjax.generate import bucket_length

DEFAULT_TOKEN_BUDGET = 8192  # tokens per scoring batch: rows = budget // bucket
DEFAULT_MAX_ROWS = 32


class LogLikelihood(NamedTuple):
    logprob: float  # sum of log-probabilities of the continuation tokens (nats)
    is_greedy: bool  # every continuation token is the model's argmax


def encode_pair(tokenizer, context: str, continuation: str, prefix_token: int | None = None):
    """(context ids, continuation ids) tokenized as the harness does."""
    prefix = tokenizer.eos_id if prefix_token is None else prefix_token
    if context == "":
        cont = list(tokenizer.encode(continuation))
        # The harness's rule: a continuation already starting with the prefix token keeps it as context.
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    n_ctx = len(tokenizer.encode(context))
    return whole[:n_ctx], whole[n_ctx:]


@partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(graphdef, state, tokens_BL, targets_BL, mask_BL):
    logits_BLV = nnx.merge(graphdef, state)(tokens_BL)
    # log p(target) = logit(target) - logsumexp(logits): never materialises the full log-softmax.
    target_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    logp_BL = target_BL - jax.nn.logsumexp(logits_BLV, axis=-1)
    greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
    return jnp.sum(jnp.where(mask_BL, logp_BL, 0.0), axis=-1), jnp.all(greedy_BL | ~mask_BL, axis=-1)


def _prepare(requests, max_length: int, vocab_size: int):
    """Per request: (input ids, target ids, number of scored positions)."""
    out = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx:
            raise ValueError(f"loglikelihood: request {i} has an empty context; start it with a prefix token (e.g. EOS)")
        if len(cont) > max_length:
            raise ValueError(f"loglikelihood: request {i}'s continuation has {len(cont)} tokens, more than max_length {max_length}")
        full = (ctx + cont)[-(max_length + 1):]
        if min(full) < 0 or max(full) >= vocab_size:
            raise ValueError(f"loglikelihood: request {i} has token ids outside [0, {vocab_size})")
        out.append((full[:-1], full[1:], len(cont)))
    return out


def loglikelihood(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int | None = None,
                  token_budget: int = DEFAULT_TOKEN_BUDGET, max_rows: int = DEFAULT_MAX_ROWS,
                  progress: bool = False) -> list[LogLikelihood]:
    """Summed log-probability of each continuation given its context (token ids).

    ``max_length`` defaults to the model's ``max_context_length``; longer
    inputs keep their last ``max_length`` tokens, as the harness does.
    ``progress`` shows a tqdm bar over requests."""
    max_length = max_length or model.cfg.max_context_length
    prepared = _prepare(requests, max_length, model.cfg.vocab_size)
    results: list[LogLikelihood | None] = [None] * len(prepared)
    by_bucket: dict[int, list[int]] = {}
    for i, (inp, _, n_cont) in enumerate(prepared):
        if n_cont == 0:
            results[i] = LogLikelihood(0.0, True)  # an empty continuation has probability 1
        else:
            by_bucket.setdefault(bucket_length(len(inp), cap=max_length), []).append(i)
    graphdef, state = nnx.split(model)
    bar = tqdm(total=len(prepared), desc="loglikelihood", unit="req", disable=not progress)
    for bucket, idxs in sorted(by_bucket.items()):
        rows = max(1, min(max_rows, token_budget // bucket))
        for start in range(0, len(idxs), rows):
            chunk = idxs[start : start + rows]
            tokens = np.zeros((rows, bucket), np.int32)
            targets = np.zeros((rows, bucket), np.int32)
            mask = np.zeros((rows, bucket), bool)
            for r, i in enumerate(chunk):
                inp, tgt, n_cont = prepared[i]
                tokens[r, : len(inp)], targets[r, : len(tgt)] = inp, tgt
                mask[r, len(inp) - n_cont : len(inp)] = True
            ll, greedy = _score_batch(graphdef, state, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(mask))
            ll, greedy = np.asarray(ll), np.asarray(greedy)
            for r, i in enumerate(chunk):
                results[i] = LogLikelihood(float(ll[r]), bool(greedy[r]))
            bar.update(len(chunk))
    bar.close()
    return results  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int, context_len: int = 1):
    """Disjoint prediction windows over a document, as (context, continuation) pairs.

    Every token is predicted exactly once. The first window predicts the first
    ``max_length`` tokens after ``prefix_token``; each later one predicts up to
    ``max_length - context_len + 1`` tokens conditioned on the preceding
    tokens, ``max_length`` inputs in all (the harness uses context_len=1)."""
    if not 1 <= context_len <= max_length:
        raise ValueError(f"rolling_windows: need 1 <= context_len <= max_length, got {context_len}, {max_length}")
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_length - context_len + 1
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        windows.append((tokens[end - max_length - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    # Drop the inputs that are also predicted: the context ends right before the continuation.
    return [(inp[: len(inp) - (len(pred) - 1)], pred) for inp, pred in windows]


def loglikelihood_rolling(model, docs: Sequence[Sequence[int]], prefix_token: int, *, max_length: int | None = None,
                          context_len: int = 1, token_budget: int = DEFAULT_TOKEN_BUDGET,
                          progress: bool = False) -> list[float]:
    """Total log-likelihood of each document (token ids), for perplexity."""
    max_length = max_length or model.cfg.max_context_length
    windows, owner = [], []
    for d, doc in enumerate(docs):
        for w in rolling_windows(doc, prefix_token, max_length, context_len):
            windows.append(w)
            owner.append(d)
    totals = [0.0] * len(docs)
    for d, res in zip(owner, loglikelihood(model, windows, max_length=max_length, token_budget=token_budget,
                                             progress=progress)):
        totals[d] += res.logprob
    return totals


def choice_metrics(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """``acc`` (argmax log-likelihood is gold) and ``acc_norm`` (per UTF-8 byte)."""
    lls = np.asarray(logprobs, dtype=np.float64)
    n_bytes = np.array([len(c.encode("utf-8")) for c in choices], dtype=np.float64)
    return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / n_bytes) == gold)}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n), the harness's formula); NaN stderr for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))
