"""LoRA and DoRA adapters as a pure function of the parameter pytree.

The model never sees an adapter: ``effective_params(base, adapters, cfg)``
returns ordinary OpenELM parameters with W' in place of each targeted weight,
and ``nnx.merge(graphdef, effective_params(...))`` runs them. Differentiating
a loss through it with respect to ``adapters`` alone gives gradients (and
optimizer state) for the adapters only; the base weights may be bfloat16.

Each target is viewed as a matrix W [in, out] (the weight flattened in
elmjax's layout: the fused QKV is group-major, see ``elmjax.model``)::

    qkv      attn.qkv_DKCE [D, K, G+2, E]  in D,       out K*(G+2)*E
    out      attn.out_KGED [K, G, E, D]    in K*G*E,   out D
    ffn_in   ffn.in_DPF    [D, 2, F]       in D,       out 2*F (gate, linear)
    ffn_out  ffn.out_FD    [F, D]          in F,       out D

An adapter holds ``A`` [rank, in] and ``B`` [out, rank] (PyTorch/PEFT's
[out, in] orientation, so saving is a copy), with s = alpha / rank:

    LoRA (Hu et al. 2021):  W' = W + s (B A)^T
    DoRA (Liu et al. 2024): W' = m * V / ||V||_c,  V = W + s (B A)^T

where ||V||_c is the norm of each output feature's column (over ``in``), held
constant in the backward pass (``stop_gradient``, the paper's section 4.3
memory saving) and ``m`` [out] starts at ||W||_c. B starts at zero, so step 0
is the base model: exactly for LoRA, up to one rounding of m/||W|| for DoRA.

Dropout: a merged weight cannot drop individual tokens' adapter inputs. With
``dropout`` p > 0 the adapter's input features are dropped instead (columns
of A zeroed with probability p and the rest scaled by 1/(1-p)), one mask per
step and target, drawn from the step number so resuming stays exact. This is
feature dropout shared by all tokens of a step, not PEFT's per-token dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

# target name -> (sub-module, parameter, number of leading axes forming ``in``)
TARGETS: dict[str, tuple[str, str, int]] = {
    "qkv": ("attn", "qkv_DKCE", 1),
    "out": ("attn", "out_KGED", 3),
    "ffn_in": ("ffn", "in_DPF", 1),
    "ffn_out": ("ffn", "out_FD", 1),
}


@dataclass(frozen=True)
class PeftConfig:
    method: Literal["lora", "dora"] = "lora"
    rank: int = 8
    alpha: float = 16.0  # scale s = alpha / rank
    dropout: float = 0.0  # feature dropout on the adapter input (see module docstring)
    targets: tuple[str, ...] = ("qkv", "out", "ffn_in", "ffn_out")
    layers: str | tuple[int, ...] = "all"  # 'all' or layer indices
    base_dtype: Literal["float32", "bfloat16"] = "float32"  # how the frozen base weights are held
    seed: int = 0  # initialisation of A (and the dropout masks)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"targets must name at least one of {list(TARGETS)}")
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"targets: unknown target {t!r}; choose among {list(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: {list(self.targets)} names a target twice")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"layers must be 'all' or a list of layer indices, got {self.layers!r}")
        elif not self.layers or any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be 'all' or distinct non-negative indices, got {list(self.layers)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        if self.layers == "all":
            return tuple(range(num_layers))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"peft.layers: {bad} out of range for a model of {num_layers} layers")
        return tuple(sorted(self.layers))


def _matrix_shape(weight_shape: tuple[int, ...], in_axes: int) -> tuple[int, int]:
    return math.prod(weight_shape[:in_axes]), math.prod(weight_shape[in_axes:])


def target_weights(params: dict, cfg: PeftConfig, num_layers: int):
    """(layer, target, weight) for every adapted weight, in a fixed order."""
    for i in cfg.layer_indices(num_layers):
        for t in cfg.targets:
            module, name, _ = TARGETS[t]
            yield i, t, params["layers"][i][module][name]


def init_adapters(params: dict, cfg: PeftConfig, num_layers: int) -> dict:
    """{layer: {target: {"A", "B"[, "m"]}}} in float32: A ~ Kaiming-uniform
    (PEFT's default, bound 1/sqrt(in)), B = 0, m = ||W||_c for DoRA."""
    key = jax.random.key(cfg.seed)
    adapters: dict = {}
    for i, t, w in target_weights(params, cfg, num_layers):
        n_in, n_out = _matrix_shape(w.shape, TARGETS[t][2])
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), list(TARGETS).index(t)),
                               (cfg.rank, n_in), jnp.float32, -bound, bound)
        entry = {"A": a, "B": jnp.zeros((n_out, cfg.rank), jnp.float32)}
        if cfg.method == "dora":
            entry["m"] = column_norm(jnp.asarray(w, jnp.float32).reshape(n_in, n_out))
        adapters.setdefault(i, {})[t] = entry
    return adapters


def column_norm(w_IO: jax.Array) -> jax.Array:
    """The norm of each output feature's weights: ||W||_c, shape [out]."""
    return jnp.sqrt(jnp.sum(jnp.square(w_IO), axis=0))


def adapted_weight(w: jax.Array, adapter: dict, cfg: PeftConfig, in_axes: int, drop_mask_I=None) -> jax.Array:
    """W' for one weight in its own layout, float32."""
    n_in, n_out = _matrix_shape(w.shape, in_axes)
    w_IO = jnp.asarray(w, jnp.float32).reshape(n_in, n_out)
    a_RI = adapter["A"]
    if drop_mask_I is not None:
        a_RI = a_RI * drop_mask_I
    v_IO = w_IO + cfg.scale * (a_RI.T @ adapter["B"].T)
    if cfg.method == "dora":
        v_IO = v_IO * (adapter["m"] / jax.lax.stop_gradient(column_norm(v_IO)))
    return v_IO.reshape(w.shape)


def _drop_masks(adapters: dict, cfg: PeftConfig, step) -> dict:
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), step)
    masks = {}
    for i, per_layer in adapters.items():
        for t, ad in per_layer.items():
            k = jax.random.fold_in(jax.random.fold_in(key, i), list(TARGETS).index(t))
            keep = jax.random.bernoulli(k, 1.0 - cfg.dropout, (ad["A"].shape[1],))
            masks[(i, t)] = keep.astype(jnp.float32) / (1.0 - cfg.dropout)
    return masks


def effective_params(base: dict, adapters: dict, cfg: PeftConfig, *, step=None) -> dict:
    """``base`` with every adapted weight replaced by W' (float32); the other
    parameters are passed through as they are. ``step`` (a traced int) turns
    on dropout when ``cfg.dropout`` > 0; None (evaluation) means no dropout."""
    masks = _drop_masks(adapters, cfg, step) if (step is not None and cfg.dropout > 0) else {}
    layers = dict(base["layers"])
    for i, per_layer in adapters.items():
        layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layers[i].items()}
        for t, ad in per_layer.items():
            module, name, in_axes = TARGETS[t]
            layer[module][name] = adapted_weight(layer[module][name], ad, cfg, in_axes, masks.get((i, t)))
        layers[i] = layer
    return {**base, "layers": layers}


def merge(base: dict, adapters: dict, cfg: PeftConfig) -> dict:
    """Plain float32 parameters with the adapters folded in (no dropout)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), effective_params(base, adapters, cfg))


def unmerge(merged: dict, adapters: dict, cfg: PeftConfig) -> dict:
    """The base parameters back from ``merge``'s output (up to float rounding).

    LoRA: W = W' - s (B A)^T. DoRA: W' = (m / n) V with V = W + s (B A)^T and
    n = ||V||_c; n cannot be recovered from W' (whose column norms are m), so
    DoRA adapters must carry it as ``norm`` (``with_merge_norms``)."""
    layers = dict(merged["layers"])
    for i, per_layer in adapters.items():
        layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layers[i].items()}
        for t, ad in per_layer.items():
            module, name, in_axes = TARGETS[t]
            w = jnp.asarray(layer[module][name], jnp.float32)
            n_in, n_out = _matrix_shape(w.shape, in_axes)
            delta_IO = cfg.scale * (ad["A"].T @ ad["B"].T)
            w_IO = w.reshape(n_in, n_out)
            if cfg.method == "dora":
                w_IO = w_IO * (ad["norm"] / ad["m"])
            layer[module][name] = (w_IO - delta_IO).reshape(w.shape)
        layers[i] = layer
    return {**merged, "layers": layers}


def with_merge_norms(base: dict, adapters: dict, cfg: PeftConfig) -> dict:
    """DoRA adapters plus ``norm`` = ||W + s(BA)^T||_c of each target, the
    one quantity ``unmerge`` cannot recover from merged weights."""
    if cfg.method != "dora":
        return adapters
    out = {}
    for i, per_layer in adapters.items():
        out[i] = {}
        for t, ad in per_layer.items():
            module, name, in_axes = TARGETS[t]
            w = base["layers"][i][module][name]
            n_in, n_out = _matrix_shape(w.shape, in_axes)
            v_IO = jnp.asarray(w, jnp.float32).reshape(n_in, n_out) + cfg.scale * (ad["A"].T @ ad["B"].T)
            out[i][t] = {**ad, "norm": column_norm(v_IO)}
    return out


def cast_base(params: dict, cfg: PeftConfig) -> dict:
    """The frozen base in ``cfg.base_dtype``: matrices only (norm weights stay float32)."""
    dtype = jnp.dtype(cfg.base_dtype)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if x.ndim >= 2 else jnp.asarray(x), params)


def count_params(adapters: dict) -> int:
    """Trainable adapter parameters (A, B and DoRA's m)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))
