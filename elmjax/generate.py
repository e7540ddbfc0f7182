"""Text generation with a per-layer KV cache, compiled once per shape.

``generate(model, prompt_ids, max_new_tokens)`` prefills the prompts and then
decodes inside one ``jax.lax.while_loop``: the cache is preallocated to
``prompt bucket + max_new_tokens`` slots (each layer with its own kv head
count) and nothing is recompiled per token. Prompts of different lengths
are right-padded and every row keeps its own positions: row b's prompt sits
at positions 0..len_b-1 and its n-th new token at len_b + n, written to the
cache slot of the same index, so a padded row computes exactly what it would
alone. Pad slots past len_b are overwritten before any query may see them.

Sampling: greedy unless ``temperature``, ``top_k`` or ``top_p`` is given;
``seed`` makes sampling reproducible. Generation of a row ends at its first
stop token, which is not returned.

CLI (a training run directory or a Hugging Face OpenELM directory)::

    python -m elmjax.generate --checkpoint PATH --prompt "Once upon a time" \
        [--max-new-tokens 64] [--temperature 0.8 --top-p 0.95 --seed 0] \
        [--tokenizer byte|sentencepiece:PATH|hf:PATH]
"""

from __future__ import annotations

import argparse
import sys
import types
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_BUCKET = 8


def bucket_length(n: int, cap: int | None = None) -> int:
    """The power of two >= n (at least MIN_BUCKET), clipped to ``cap``."""
    b = max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())
    return max(n, min(b, cap)) if cap is not None else b


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [B, bucket] int32 tokens and the [B] prompt lengths."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    if len(prompts) == 0:
        raise ValueError("generate: no prompts given")
    if lengths.min() == 0:
        raise ValueError(f"generate: prompt {int(lengths.argmin())} is empty; give at least one token (e.g. the EOS id)")
    tokens = np.zeros((len(prompts), bucket_length(int(lengths.max()))), dtype=np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = np.asarray(p, dtype=np.int64)
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"generate: token ids must be in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")
    return tokens, lengths


# ------------------------------------------------------------- compiled core


def prefill(model, tokens_BP: jax.Array, cache_len: int):
    """Run the prompts through the model, filling fresh caches of ``cache_len`` slots.

    Returns logits [B, P, V] and the caches. Query l sees slots 0..l (causal)."""
    B, P = tokens_BP.shape
    caches = model.init_cache(B, cache_len)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    mask_BPS = jnp.arange(cache_len)[None, None, :] <= positions_BP[:, :, None]
    return model.decode(tokens_BP, positions_BP, caches, mask_BPS)


def decode_step(model, tokens_B: jax.Array, positions_B: jax.Array, caches):
    """Feed one token per row at its own position; logits [B, V] and new caches."""
    cache_len = caches[0].k_BSKE.shape[1]
    mask_B1S = jnp.arange(cache_len)[None, None, :] <= positions_B[:, None, None]
    logits_B1V, caches = model.decode(tokens_B[:, None], positions_B[:, None], caches, mask_B1S)
    return logits_B1V[:, 0], caches


def sample(logits_BV, key, temperature, top_k, top_p, mode: str):
    """Next tokens [B]. ``mode``: 'greedy' | 'sample' | 'filter' (top-k/top-p).

    ``top_k`` (0 = off) and ``top_p`` (1 = off) are traced values so changing
    them does not recompile; only the mode is static."""
    if mode == "greedy":
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if mode == "filter":
        V = logits_BV.shape[-1]
        sorted_BV = -jnp.sort(-logits_BV, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        sorted_BV = jnp.where(jnp.arange(V) < k, sorted_BV, -jnp.inf)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the best token).
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        keep_BV = keep_BV.at[:, 0].set(True)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new", "mode"))
def _generate_core(graphdef, state, tokens_BP, lengths_B, stop_ids, temperature, top_k, top_p, key, *, max_new, mode):
    model = nnx.merge(graphdef, state)
    B, P = tokens_BP.shape
    rows = jnp.arange(B)
    logits_BPV, caches = prefill(model, tokens_BP, P + max_new)
    key, sub = jax.random.split(key)
    tok_B = sample(logits_BPV[rows, lengths_B - 1], sub, temperature, top_k, top_p, mode)
    out_BN = jnp.full((B, max_new), -1, jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, stop_ids)

    def cond(carry):
        step, _, _, done_B, _, _ = carry
        return (step < max_new) & ~jnp.all(done_B)

    def body(carry):
        step, tok_B, caches, done_B, out_BN, key = carry
        logits_BV, caches = decode_step(model, tok_B, lengths_B + step - 1, caches)
        key, sub = jax.random.split(key)
        tok_B = sample(logits_BV, sub, temperature, top_k, top_p, mode)
        out_BN = out_BN.at[:, step].set(jnp.where(done_B, -1, tok_B))
        return step + 1, tok_B, caches, done_B | jnp.isin(tok_B, stop_ids), out_BN, key

    carry = (jnp.int32(1), tok_B, caches, done_B, out_BN, key)
    return jax.lax.while_loop(cond, body, carry)[4]


# ------------------------------------------------------------------ the API


def _sampling_mode(temperature, top_k, top_p) -> tuple[str, float, int, float]:
    if temperature is None and top_k is None and top_p is None:
        return "greedy", 1.0, 0, 1.0
    temperature = 1.0 if temperature is None else float(temperature)
    top_k, top_p = int(top_k or 0), 1.0 if top_p is None else float(top_p)
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return "greedy", 1.0, 0, 1.0
    mode = "filter" if top_k > 0 or top_p < 1 else "sample"
    return mode, temperature, top_k, top_p


def _trim(row: np.ndarray, stops: set[int]) -> list[int]:
    out = []
    for t in row.tolist():
        if t < 0 or t in stops:
            break
        out.append(t)
    return out


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = ()):
    """New token ids for one prompt (a list of ints) or a batch (a list of lists).

    Greedy when no sampling option is given (or ``temperature=0``); otherwise
    samples at ``temperature`` (default 1) from the ``top_k`` most likely
    tokens and/or the smallest set of mass ``top_p``. A row stops at its first
    token in ``stop_tokens`` (not returned). Works on any ``OpenELM``."""
    single = len(prompt_ids) > 0 and np.ndim(prompt_ids[0]) == 0
    prompts = [prompt_ids] if single else list(prompt_ids)
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens_BP, lengths_B = pad_prompts(prompts, model.cfg.vocab_size)
    limit = model.cfg.max_context_length
    if int(lengths_B.max()) + max_new_tokens > limit:
        raise ValueError(f"generate: longest prompt ({int(lengths_B.max())} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_context_length {limit}")
    mode, temperature, top_k, top_p = _sampling_mode(temperature, top_k, top_p)
    stops = sorted({int(s) for s in stop_tokens})
    # Padded (with an id no token has) to a bucket so the stop count does not change the compiled shape.
    stop_ids = np.full(bucket_length(len(stops)), -2, np.int32)
    stop_ids[: len(stops)] = stops
    graphdef, state = nnx.split(model)
    out_BN = _generate_core(
        graphdef, state, jnp.asarray(tokens_BP), jnp.asarray(lengths_B), jnp.asarray(stop_ids),
        jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jax.random.key(seed),
        max_new=int(max_new_tokens), mode=mode,
    )
    rows = [_trim(r, set(stops)) for r in np.asarray(out_BN)]
    return rows[0] if single else rows


@partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, tokens_BL):
    return nnx.merge(graphdef, state)(tokens_BL)


def generate_recompute(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy generation without a cache: the whole prefix is recomputed for
    every new token (lengths bucketed to powers of two so it compiles a few
    times, not per token). The benchmark baseline and the tests' oracle."""
    tokens_BP, lengths_B = pad_prompts(prompts, model.cfg.vocab_size)
    total = int(lengths_B.max()) + max_new_tokens
    buf = np.zeros((len(prompts), bucket_length(total)), dtype=np.int32)
    buf[:, : tokens_BP.shape[1]] = tokens_BP
    graphdef, state = nnx.split(model)
    rows = np.arange(len(prompts))
    for step in range(max_new_tokens):
        width = bucket_length(int(lengths_B.max()) + step)
        logits = _forward(graphdef, state, jnp.asarray(buf[:, :width]))
        buf[rows, lengths_B + step] = np.asarray(jnp.argmax(logits[rows, lengths_B + step - 1], axis=-1))
    return [buf[i, lengths_B[i] : lengths_B[i] + max_new_tokens].tolist() for i in rows]


# --------------------------------------------------------- loading for the CLIs


def load_model(path: str | Path, dtype: str | None = None):
    """A model from a training run directory or a Hugging Face OpenELM directory."""
    from elmjax.checkpoint import load_model as _load

    return _load(path, dtype=dtype)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions the CLIs report as one 'error:' line (bad paths, files, options)."""
    from elmjax.checkpoint import CheckpointError

    return (ValueError, OSError, ImportError, CheckpointError)


def tokenizer_spec_for(path: str | Path) -> str:
    """The tokenizer a checkpoint was made with: the run's ``data.tokenizer``,
    or a tokenizer.json / tokenizer.model inside a Hugging Face directory."""
    path = Path(path)
    if path.name == "checkpoints" and not (path / "config.yaml").exists():
        path = path.parent
    if (path / "config.yaml").is_file():
        from elmjax.config_io import load_yaml

        data = load_yaml(path / "config.yaml").get("data") or {}
        return data.get("tokenizer", "byte")
    if (path / "config.json").is_file():
        import json

        try:
            recorded = json.loads((path / "config.json").read_text()).get("elmjax_tokenizer")
        except (OSError, ValueError, AttributeError):
            recorded = None  # load_model reports what is wrong with config.json
        if recorded == "byte":
            return "byte"
    for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "sentencepiece")):
        if (path / name).is_file():
            return f"{kind}:{path / name}"
    raise ValueError(
        f"{path}: no config.yaml, tokenizer.json or tokenizer.model to tell the tokenizer; pass one with --tokenizer "
        "(OpenELM on the Hub uses the Llama-2 tokenizer: --tokenizer sentencepiece:/path/to/tokenizer.model)"
    )


def load_for_inference(checkpoint: str | Path, tokenizer=None, dtype: str | None = None):
    """(model, tokenizer) for a checkpoint; ``tokenizer`` is a spec, a Tokenizer or None (from the checkpoint)."""
    from elmjax.tokenizer import load_tokenizer

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file or directory")
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer or tokenizer_spec_for(checkpoint))
    model = load_model(checkpoint, dtype=dtype)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer '{tokenizer.spec}' has {tokenizer.vocab_size} ids but the model at {checkpoint} "
                         f"only {model.cfg.vocab_size}: wrong tokenizer for this checkpoint?")
    return model, tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m elmjax.generate", description="Generate text from an elmjax or OpenELM checkpoint.")
    p.add_argument("--checkpoint", required=True, help="training run directory or Hugging Face OpenELM directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--tokenizer", default=None, help="byte | sentencepiece:PATH | hf:PATH (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the tokenizer's EOS")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model, tok = load_for_inference(args.checkpoint, args.tokenizer, args.dtype)
        prompts = [tok.encode(p) for p in args.prompt]
        outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_tokens=() if args.no_stop else (tok.eos_id,))
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, out in zip(args.prompt, outs):
        print(text + tok.decode(out))
        if len(args.prompt) > 1:
            print("-" * 40)
    return 0


class _CallableModule(types.ModuleType):
    """``elmjax.generate`` is the function through elmjax's lazy table, but
    importing this submodule makes Python bind the attribute to the module
    itself; making the module callable keeps ``elmjax.generate(model, ...)``
    working in either order."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
