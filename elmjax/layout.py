"""Layer-wise scaling as data: config -> per-layer (q_heads, kv_heads, ffn_dim).

This reproduces OpenELM's ``configuration_openelm.py`` exactly (multipliers
from ``numpy.linspace`` rounded to 2 decimals, MobileNet ``make_divisible``)
and extends it with named depth schedules. Everything here is pure Python +
numpy so the sweep planner and analysis can use it without JAX.

``python -m elmjax.layout OpenELM-270M [--plot out.png]`` prints the table.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import numpy as np

from elmjax.model_config import ModelConfig, Multipliers, PRESETS, preset


class LayerLayout(NamedTuple):
    q_heads: int
    kv_heads: int
    ffn_dim: int


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """MobileNet rounding used by OpenELM: nearest multiple of ``divisor``,
    at least ``min_value`` (one multiple), never more than 10% below ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _shape(t: np.ndarray, schedule: str) -> np.ndarray:
    """Fraction of the way from min to max at relative depth t in [0, 1]."""
    if schedule == "linear":
        return t
    if schedule == "reverse":
        return 1.0 - t
    if schedule == "middle":
        return 1.0 - np.abs(2.0 * t - 1.0)
    if schedule == "ends":
        return np.abs(2.0 * t - 1.0)
    if schedule == "constant":
        # The mean of the bounds: same average multiplier as 'linear'.
        return np.full_like(t, 0.5)
    raise ValueError(f"unknown schedule {schedule!r}")


def layer_multipliers(value: Multipliers, schedule: str, num_layers: int) -> tuple[float, ...]:
    """Per-layer multipliers, rounded to 2 decimals as OpenELM does for bounds."""
    if isinstance(value, (int, float)):
        return (float(value),) * num_layers
    if len(value) == 2:
        lo, hi = value
        if schedule == "linear":
            # Exactly OpenELM's expression, so float rounding matches too.
            raw = np.linspace(lo, hi, num=num_layers, dtype=float)
        else:
            t = np.linspace(0.0, 1.0, num=num_layers, dtype=float) if num_layers > 1 else np.zeros(1)
            raw = lo + (hi - lo) * _shape(t, schedule)
        return tuple(round(float(v), 2) for v in raw)
    if len(value) != num_layers:
        raise ValueError(f"expected {num_layers} per-layer multipliers, got {len(value)}")
    return tuple(float(v) for v in value)


def layer_layout(cfg: ModelConfig) -> tuple[LayerLayout, ...]:
    """The one function that maps a config to its per-layer layout."""
    alphas = layer_multipliers(cfg.qkv_multipliers, cfg.qkv_schedule, cfg.num_layers)
    betas = layer_multipliers(cfg.ffn_multipliers, cfg.ffn_schedule, cfg.num_layers)
    out = []
    for alpha, beta in zip(alphas, betas):
        q_dim = make_divisible(cfg.model_dim * alpha, divisor=cfg.head_dim * cfg.num_gqa_groups * cfg.head_multiple)
        q_heads = q_dim // cfg.head_dim
        ffn_dim = make_divisible(beta * cfg.model_dim, divisor=cfg.ffn_dim_divisor)
        out.append(LayerLayout(q_heads, q_heads // cfg.num_gqa_groups, ffn_dim))
    return tuple(out)


# ----------------------------------------------------------------- accounting


class ParamCounts(NamedTuple):
    total: int
    embedding: int
    non_embedding: int


def layer_params(cfg: ModelConfig, layer: LayerLayout) -> int:
    d, hd = cfg.model_dim, cfg.head_dim
    qkv = d * (layer.q_heads + 2 * layer.kv_heads) * hd
    out = layer.q_heads * hd * d
    ffn_in = d * layer.ffn_dim * (2 if cfg.ffn_with_glu else 1)
    ffn_out = layer.ffn_dim * d
    norms = 2 * d + (2 * hd if cfg.normalize_qk else 0)
    return qkv + out + ffn_in + ffn_out + norms


def per_layer_params(cfg: ModelConfig) -> tuple[int, ...]:
    return tuple(layer_params(cfg, layer) for layer in layer_layout(cfg))


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts. 'embedding' is the token table (plus the output
    head when untied); everything else, final norm included, is non-embedding."""
    embedding = cfg.vocab_size * cfg.model_dim * (1 if cfg.tie_embeddings else 2)
    non_embedding = sum(per_layer_params(cfg)) + cfg.model_dim
    return ParamCounts(embedding + non_embedding, embedding, non_embedding)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Matmul FLOPs of one forward pass per token (2 per multiply-add).

    Attention scores (QK^T and AV) are counted over the full context of
    ``seq_len`` as in the PaLM/Chinchilla convention (no causal halving);
    the output head counts even when tied. Norms and softmax are ignored."""
    d, hd = cfg.model_dim, cfg.head_dim
    total = 0
    for layer in layer_layout(cfg):
        matmul_params = d * (layer.q_heads + 2 * layer.kv_heads) * hd + layer.q_heads * hd * d
        matmul_params += d * layer.ffn_dim * (2 if cfg.ffn_with_glu else 1) + layer.ffn_dim * d
        total += 2 * matmul_params
        total += 2 * 2 * layer.q_heads * hd * seq_len
    total += 2 * d * cfg.vocab_size
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward (backward = 2x forward) matmul FLOPs per token."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Bytes of key+value cache one token occupies across all layers."""
    return sum(2 * layer.kv_heads * cfg.head_dim * bytes_per_value for layer in layer_layout(cfg))


# ------------------------------------------------------------------------ CLI


def load_model_config(spec: str, overrides=()) -> ModelConfig:
    """A preset name, or a YAML file holding a model config (top level or under 'model:')."""
    from elmjax import config_io

    if spec in PRESETS and not overrides:
        return preset(spec)
    if spec in PRESETS:
        data = config_io.to_dict(preset(spec))
        return config_io.load(ModelConfig, None, overrides, data=data)
    from pathlib import Path

    if not Path(spec).exists():
        raise config_io.ConfigError(
            f"{spec}: neither a preset nor an existing YAML file{config_io.suggest(spec, PRESETS)}; "
            f"presets: {', '.join(PRESETS)}"
        )
    raw = config_io.load_yaml(spec)
    if "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]
    data = raw
    for text in overrides:
        key, value = config_io.parse_override(text)
        data = config_io.set_dotted(data, ModelConfig, key, value, source=f"override {text!r}")
    return config_io.from_dict(ModelConfig, data, source=f"{spec}: model")


def format_table(cfg: ModelConfig, seq_len: int) -> str:
    alphas = layer_multipliers(cfg.qkv_multipliers, cfg.qkv_schedule, cfg.num_layers)
    betas = layer_multipliers(cfg.ffn_multipliers, cfg.ffn_schedule, cfg.num_layers)
    rows = [f"{'layer':>5} {'alpha':>6} {'beta':>6} {'q_heads':>7} {'kv_heads':>8} {'ffn_dim':>8} {'params':>13}"]
    for i, (layer, a, b, p) in enumerate(zip(layer_layout(cfg), alphas, betas, per_layer_params(cfg))):
        rows.append(f"{i:>5} {a:>6.2f} {b:>6.2f} {layer.q_heads:>7} {layer.kv_heads:>8} {layer.ffn_dim:>8} {p:>13,}")
    counts = param_counts(cfg)
    rows += [
        "",
        f"total params          {counts.total:>16,}",
        f"embedding params      {counts.embedding:>16,}",
        f"non-embedding params  {counts.non_embedding:>16,}",
        f"train FLOPs/token     {train_flops_per_token(cfg, seq_len):>16,}  (seq_len {seq_len})",
        f"KV cache bytes/token  {kv_cache_bytes_per_token(cfg):>16,}  (bf16)",
    ]
    return "\n".join(rows)


def plot_allocation(cfgs: dict[str, ModelConfig], path: str) -> None:
    """Heads and FFN width against depth, one line per named config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_f) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, cfg in cfgs.items():
        lay = layer_layout(cfg)
        depth = np.arange(cfg.num_layers)
        ax_h.plot(depth, [x.q_heads for x in lay], marker="o", label=f"{name} query")
        ax_h.plot(depth, [x.kv_heads for x in lay], marker=".", ls="--", label=f"{name} kv")
        ax_f.plot(depth, [x.ffn_dim for x in lay], marker="o", label=name)
    ax_h.set(xlabel="layer", ylabel="heads", title="attention heads")
    ax_f.set(xlabel="layer", ylabel="FFN width", title="FFN width")
    ax_h.legend(fontsize=7)
    ax_f.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from elmjax.cli import positive_int

    parser = argparse.ArgumentParser(prog="python -m elmjax.layout", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help=f"preset ({', '.join(PRESETS)}) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. qkv_schedule=middle")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="sequence length for FLOPs (default: max_context_length)")
    parser.add_argument("--plot", metavar="PNG", help="draw heads and FFN width against depth to this file")
    args = parser.parse_args(argv)
    from elmjax.config_io import ConfigError

    try:
        cfg = load_model_config(args.spec, args.overrides)
    except (ConfigError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(cfg, args.seq_len or cfg.max_context_length))
    if args.plot:
        plot_allocation({args.spec: cfg}, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
