"""Load and save OpenELM checkpoints in the layout Apple published on the Hub.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or
shards listed in ``model.safetensors.index.json``). PyTorch ``Linear``
weights are [out, in]; the fused QKV weight's rows are all query heads, then
key heads, then value heads; ``ffn.proj_1``'s rows are the SiLU gate, then the
linear branch. Nothing here downloads: ``path`` is a local directory.

The Hub layout is OpenELM's standard parametrization. A muP model
(``elmjax.mup``) is exported with its forward multipliers folded into the
weights, so any OpenELM implementation computes the same logits: the logit
multiplier into the final norm's gain, and the ratio of muP's attention scale
to OpenELM's (1/head_dim over 1/sqrt(head_dim)) into the query: the q_norm
gain with QK-norm, else the query rows of the qkv weight (RoPE is linear, so
scaling q before it scales the scores alike). Its config.json is a standard
one; loading it back gives a standard model with the same logits.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from elmjax.checkpoint import CheckpointError
from elmjax.config_io import atomic_write, atomic_write_text, to_dict
from elmjax.errors import UserError
from elmjax import mup
from elmjax.layout import layer_layout
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig


_REQUIRED = ("num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups", "vocab_size")


# ----------------------------------------------------------------- config.json


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an OpenELM ``config.json`` mapping."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing}; not an OpenELM config")
    _check_types(hf, source)
    if "elmjax" in hf:
        # Written by save_pretrained: restores schedules exactly.
        from elmjax.config_io import from_dict

        cfg = from_dict(ModelConfig, hf["elmjax"], source=f"{source}: elmjax")
        for hf_key, key in _SAME_IN_BOTH.items():
            if hf[hf_key] != getattr(cfg, key):
                raise CheckpointError(f"{source}: {hf_key} {hf[hf_key]!r} disagrees with elmjax.{key} "
                                      f"{getattr(cfg, key)!r}; edit both or delete the 'elmjax' section")
        return cfg
    n, d, e = hf["num_transformer_layers"], hf["model_dim"], hf["head_dim"]
    qkv = hf.get("qkv_multipliers", (0.5, 1.0))
    if "num_query_heads" in hf:
        # Per-layer head counts are authoritative; express them as explicit
        # multipliers, which make_divisible maps back to the same counts.
        qkv = tuple(q * e / d for q in hf["num_query_heads"])
    ffn = hf.get("ffn_multipliers", (0.5, 4.0))
    try:
        cfg = ModelConfig(
            num_layers=n,
            model_dim=d,
            head_dim=e,
            num_gqa_groups=hf["num_gqa_groups"],
            qkv_multipliers=qkv if not isinstance(qkv, list) else tuple(qkv),
            ffn_multipliers=tuple(ffn) if isinstance(ffn, list) else ffn,
            ffn_dim_divisor=hf.get("ffn_dim_divisor", 256),
            ffn_with_glu=hf.get("ffn_with_glu", True),
            normalize_qk=hf.get("normalize_qk_projections", False),
            tie_embeddings=hf.get("share_input_output_layers", False),
            rope_theta=float(hf.get("rope_freq_constant", 10000)),
            max_context_length=hf.get("max_context_length", 2048),
            vocab_size=hf["vocab_size"],
        )
    except ValueError as e:  # ModelConfig's own checks (multipliers, head_dim parity, ...)
        raise CheckpointError(f"{source}: {e}") from None
    _check_heads(cfg, hf, source)
    return cfg


_SAME_IN_BOTH = {"num_transformer_layers": "num_layers", "model_dim": "model_dim", "head_dim": "head_dim",
                 "num_gqa_groups": "num_gqa_groups", "vocab_size": "vocab_size"}

# config.json key -> what it must hold; checked before any arithmetic so a
# wrong type is one error naming the key, not a TypeError deep in the layout.
_POSITIVE_INTS = ("num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups", "vocab_size",
                  "ffn_dim_divisor", "max_context_length")
_BOOLS = ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers")
_NUMBER_LISTS = ("qkv_multipliers", "ffn_multipliers")
_INT_LISTS = ("num_query_heads", "num_kv_heads")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_types(hf: dict, source: str) -> None:
    for key in _POSITIVE_INTS:
        if key in hf and not (isinstance(hf[key], int) and not isinstance(hf[key], bool) and hf[key] >= 1):
            raise CheckpointError(f"{source}: {key}: expected a positive integer, got {hf[key]!r}")
    for key in _BOOLS:
        if key in hf and not isinstance(hf[key], bool):
            raise CheckpointError(f"{source}: {key}: expected true/false, got {hf[key]!r}")
    for key in _NUMBER_LISTS:
        v = hf.get(key)
        if v is not None and not (_is_number(v) or (isinstance(v, list) and v and all(map(_is_number, v)))):
            raise CheckpointError(f"{source}: {key}: expected a number or a list of numbers, got {v!r}")
    for key in _INT_LISTS:
        v = hf.get(key)
        if v is not None and not (isinstance(v, list) and v and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
            raise CheckpointError(f"{source}: {key}: expected a list of positive integers (one per layer), got {v!r}")
    if "rope_freq_constant" in hf and not (_is_number(hf["rope_freq_constant"]) and hf["rope_freq_constant"] > 0):
        raise CheckpointError(f"{source}: rope_freq_constant: expected a positive number, got {hf['rope_freq_constant']!r}")


def _check_heads(cfg: ModelConfig, hf: dict, source: str) -> None:
    lay = layer_layout(cfg)
    for key, got in (("num_query_heads", [x.q_heads for x in lay]), ("num_kv_heads", [x.kv_heads for x in lay])):
        if key in hf and list(hf[key]) != got:
            raise CheckpointError(f"{source}: {key} {list(hf[key])} disagrees with the derived layout {got}")


def exported_config(cfg: ModelConfig) -> ModelConfig:
    """The config of ``cfg``'s Hub export: the same model in the standard parametrization."""
    return cfg.replace(parametrization="standard", mup_base_width=ModelConfig.mup_base_width)


def _elmjax_section(cfg: ModelConfig) -> dict:
    # Standard (always, after export) leaves the muP keys out, so the section
    # reads the same as before muP existed, and older elmjax versions load it.
    d = to_dict(exported_config(cfg))
    del d["parametrization"], d["mup_base_width"]
    return d


def config_to_hf(cfg: ModelConfig, torch_dtype: str, tokenizer=None) -> dict:
    """The Hub config.json mapping; ``tokenizer`` (a Tokenizer) supplies the special-token ids.
    A muP ``cfg`` is described as its standard equivalent (see the module docstring)."""
    lay = layer_layout(cfg)
    from elmjax.layout import layer_multipliers

    qkv = cfg.qkv_multipliers
    return {
        "architectures": ["OpenELMForCausalLM"],
        "model_type": "openelm",
        "num_transformer_layers": cfg.num_layers,
        "model_dim": cfg.model_dim,
        "head_dim": cfg.head_dim,
        "num_gqa_groups": cfg.num_gqa_groups,
        "qkv_multipliers": list(qkv) if isinstance(qkv, tuple) else qkv,
        "num_query_heads": [x.q_heads for x in lay],
        "num_kv_heads": [x.kv_heads for x in lay],
        "ffn_multipliers": list(layer_multipliers(cfg.ffn_multipliers, cfg.ffn_schedule, cfg.num_layers)),
        "ffn_dim_divisor": cfg.ffn_dim_divisor,
        "ffn_with_glu": cfg.ffn_with_glu,
        "normalize_qk_projections": cfg.normalize_qk,
        "share_input_output_layers": cfg.tie_embeddings,
        "rope_freq_constant": cfg.rope_theta,
        "rope_max_length": max(4096, cfg.max_context_length),
        "max_context_length": cfg.max_context_length,
        "vocab_size": cfg.vocab_size,
        "activation_fn_name": "swish",
        "initializer_range": 0.02,
        # The tokenizer's own ids (byte: BOS 257, EOS 256); null when no tokenizer is given.
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": tokenizer.eos_id if tokenizer is not None else None,
        "torch_dtype": torch_dtype,
        "elmjax": _elmjax_section(cfg),
        **({"elmjax_tokenizer": tokenizer.spec.partition(":")[0]} if tokenizer is not None else {}),
    }


# --------------------------------------------------------------- weight names


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the released layout with its [out, in] shape."""
    d, e = cfg.model_dim, cfg.head_dim
    shapes = {"transformer.token_embeddings.weight": (cfg.vocab_size, d), "transformer.norm.weight": (d,)}
    for i, lay in enumerate(layer_layout(cfg)):
        p = f"transformer.layers.{i}."
        shapes[p + "attn.qkv_proj.weight"] = ((lay.q_heads + 2 * lay.kv_heads) * e, d)
        shapes[p + "attn.out_proj.weight"] = (d, lay.q_heads * e)
        if cfg.normalize_qk:
            shapes[p + "attn.q_norm.weight"] = (e,)
            shapes[p + "attn.k_norm.weight"] = (e,)
        shapes[p + "ffn.proj_1.weight"] = ((2 if cfg.ffn_with_glu else 1) * lay.ffn_dim, d)
        shapes[p + "ffn.proj_2.weight"] = (d, lay.ffn_dim)
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def qkv_to_hub_order(qkv_DKCE: np.ndarray) -> np.ndarray:
    """Group-major [D, K, G+2, E] -> the Hub's [D, H+2K, E] (all queries, keys, values).

    Query head h = k*G + g in both layouts, so this is a pure regrouping."""
    d, k, c, e = qkv_DKCE.shape
    g = c - 2
    q = qkv_DKCE[:, :, :g].reshape(d, k * g, e)
    return np.concatenate([q, qkv_DKCE[:, :, g], qkv_DKCE[:, :, g + 1]], axis=1)


def qkv_from_hub_order(qkv_DTE: np.ndarray, q_heads: int, kv_heads: int) -> np.ndarray:
    """The Hub's [D, H+2K, E] -> group-major [D, K, G+2, E]; inverse of ``qkv_to_hub_order``."""
    d, _, e = qkv_DTE.shape
    g = q_heads // kv_heads
    q = qkv_DTE[:, :q_heads].reshape(d, kv_heads, g, e)
    k = qkv_DTE[:, q_heads : q_heads + kv_heads, None]
    v = qkv_DTE[:, q_heads + kv_heads :, None]
    return np.concatenate([q, k, v], axis=2)


def _layer_to_hf(layer: dict, cfg: ModelConfig, prefix: str) -> dict[str, np.ndarray]:
    d = cfg.model_dim
    qkv_DTE = qkv_to_hub_order(layer["attn"]["qkv_DKCE"])
    out_KGED = layer["attn"]["out_KGED"]
    in_DPF = layer["ffn"]["in_DPF"]
    t = {
        prefix + "attn.qkv_proj.weight": qkv_DTE.reshape(d, -1).T,
        prefix + "attn.out_proj.weight": out_KGED.reshape(-1, d).T,
        prefix + "ffn.proj_1.weight": in_DPF.reshape(d, -1).T,
        prefix + "ffn.proj_2.weight": layer["ffn"]["out_FD"].T,
        prefix + "attn_norm.weight": layer["attn_norm"]["weight"],
        prefix + "ffn_norm.weight": layer["ffn_norm"]["weight"],
    }
    if cfg.normalize_qk:
        t[prefix + "attn.q_norm.weight"] = layer["attn"]["q_norm"]["weight"]
        t[prefix + "attn.k_norm.weight"] = layer["attn"]["k_norm"]["weight"]
    return t


def fold_mup(cfg: ModelConfig, params: dict) -> dict:
    """Numpy ``params`` of a ``cfg`` model -> those of ``exported_config(cfg)``
    computing the same logits (a copy; unchanged under standard)."""
    if not mup.is_mup(cfg):
        return params
    std = exported_config(cfg)
    q_ratio = mup.attention_scale(cfg) / mup.attention_scale(std)
    out = {**params, "norm": {"weight": params["norm"]["weight"] * mup.logit_multiplier(cfg)}}
    out["layers"] = {}
    for i, layer in params["layers"].items():
        attn = dict(layer["attn"])
        if cfg.normalize_qk:
            # RMSNorm(q) * gain: scaling the gain scales q exactly.
            attn["q_norm"] = {"weight": attn["q_norm"]["weight"] * q_ratio}
        else:
            qkv = attn["qkv_DKCE"].copy()
            groups = qkv.shape[2] - 2
            qkv[:, :, :groups] *= q_ratio  # the query slots of each kv group
            attn["qkv_DKCE"] = qkv
        out["layers"][i] = {**layer, "attn": attn}
    return out


def params_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Pure-dict NNX params -> Hub tensor names ([out, in] weights); a muP
    model's multipliers are folded in (``fold_mup``)."""
    params = fold_mup(cfg, jax.tree.map(np.asarray, params))
    out = {
        "transformer.token_embeddings.weight": params["embed_VD"],
        "transformer.norm.weight": params["norm"]["weight"],
    }
    for i in range(cfg.num_layers):
        out.update(_layer_to_hf(params["layers"][i], cfg, f"transformer.layers.{i}."))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["head_DV"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def params_from_hf(cfg: ModelConfig, t: dict[str, np.ndarray]) -> dict:
    """Hub tensors (already shape-checked) -> pure-dict NNX params in float32."""
    t = {k: np.asarray(v, dtype=np.float32) for k, v in t.items()}
    d, e = cfg.model_dim, cfg.head_dim
    layers = {}
    for i, lay in enumerate(layer_layout(cfg)):
        p = f"transformer.layers.{i}."
        attn = {
            "qkv_DKCE": qkv_from_hub_order(t[p + "attn.qkv_proj.weight"].T.reshape(d, lay.q_heads + 2 * lay.kv_heads, e),
                                           lay.q_heads, lay.kv_heads),
            "out_KGED": t[p + "attn.out_proj.weight"].T.reshape(lay.kv_heads, lay.q_heads // lay.kv_heads, e, d),
        }
        if cfg.normalize_qk:
            attn["q_norm"] = {"weight": t[p + "attn.q_norm.weight"]}
            attn["k_norm"] = {"weight": t[p + "attn.k_norm.weight"]}
        layers[i] = {
            "attn": attn,
            "attn_norm": {"weight": t[p + "attn_norm.weight"]},
            "ffn": {
                "in_DPF": t[p + "ffn.proj_1.weight"].T.reshape(d, -1, lay.ffn_dim),
                "out_FD": t[p + "ffn.proj_2.weight"].T,
            },
            "ffn_norm": {"weight": t[p + "ffn_norm.weight"]},
        }
    params = {"embed_VD": t["transformer.token_embeddings.weight"], "layers": layers, "norm": {"weight": t["transformer.norm.weight"]}}
    if not cfg.tie_embeddings:
        params["head_DV"] = t["lm_head.weight"].T
    return params


# ------------------------------------------------------------------ file I/O


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = [path / "model.safetensors"]
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: weight file missing")
    return files


def read_tensors(path: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Read and shape-check every tensor the config needs."""
    expected = expected_hf_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="numpy") as fh:
            for key in fh.keys():
                if key not in expected:
                    raise CheckpointError(f"{f.name}: unexpected tensor '{key}' (unknown layout for this config)")
                shape = tuple(fh.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(f"{f.name}: '{key}' has shape {shape}, the config expects {expected[key]}")
                tensors[key] = fh.get_tensor(key)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return tensors


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or a CheckpointError naming it (missing or invalid)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def from_pretrained(path: str | os.PathLike, dtype: str = "float32") -> OpenELM:
    """An OpenELM model from a local Hub-layout directory.

    Parameters are float32 whatever the file's dtype; ``dtype`` is the compute
    dtype ('float32' or 'bfloat16')."""
    path = Path(path)
    cfg_file = path / "config.json"
    cfg = config_from_hf(read_json(cfg_file), str(cfg_file))
    params = params_from_hf(cfg, read_tensors(path, cfg))
    abstract = nnx.eval_shape(lambda: OpenELM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, state)


def save_pretrained(model: OpenELM, path: str | os.PathLike, *, tokenizer=None, dtype: str = "float32",
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` in the Hub layout. Files appear only when complete.

    ``tokenizer`` (a Tokenizer or a spec such as 'byte' or 'hf:PATH') gives
    config.json its bos/eos ids, and its file is saved next to the weights
    (``tokenizer.model`` or ``tokenizer.json``) so generate/evaluate find it;
    without one the ids are null and the CLIs need ``--tokenizer``."""
    import ml_dtypes

    from elmjax.tokenizer import copy_tokenizer_files, load_tokenizer

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    cfg = model.cfg
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {k: v.astype(np_dtype) for k, v in params_to_hf(cfg, params).items()}
    shards = _split_shards(tensors, max_shard_bytes)
    path = Path(path)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    # Each file appears only when complete; config.json goes last, so a
    # directory with a config always has all its weights.
    for name, shard in zip(names, shards):
        atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
            "weight_map": {k: n for n, s in zip(names, shards) for k in s},
        }
        atomic_write_text(path / "model.safetensors.index.json", json.dumps(index, indent=1))
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer.spec, path)  # byte: no file; config.json records the kind
    atomic_write_text(path / "config.json", json.dumps(config_to_hf(cfg, dtype, tokenizer), indent=1) + "\n")
    return path


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in tensors.items():
        if shards[-1] and size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards
