"""Adapters on disk in the Hugging Face PEFT layout, and merged exports.

``save_adapters(dir, ...)`` writes what ``PeftModel.save_pretrained`` writes
for a LoRA/DoRA adapter on Apple's OpenELM modeling code:

* ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules`` (qkv_proj, out_proj, proj_1, proj_2),
  ``layers_to_transform`` (null for all layers), ``use_dora``;
* ``adapter_model.safetensors`` with keys
  ``base_model.model.transformer.layers.{i}.attn.qkv_proj.lora_A.weight``
  [r, in], ``...lora_B.weight`` [out, r] and, for DoRA,
  ``...lora_magnitude_vector`` [out]; the output features of ``qkv_proj`` are
  in the Hub's [queries, keys, values] order, as the base weight's are.

``load_adapters`` reads them back; ``export_merged`` folds adapters into the
base weights and writes a plain OpenELM directory with ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from elmjax.checkpoint import CheckpointError
from elmjax.config_io import atomic_write, atomic_write_text
from elmjax.hf_interop import qkv_from_hub_order, qkv_to_hub_order, read_json
from elmjax.layout import layer_layout
from elmjax.model_config import ModelConfig
from elmjax.peft import PeftConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.transformer.layers."
HF_MODULES = {"qkv": "attn.qkv_proj", "out": "attn.out_proj", "ffn_in": "ffn.proj_1", "ffn_out": "ffn.proj_2"}
_SHORT = {v.split(".")[1]: k for k, v in HF_MODULES.items()}  # qkv_proj -> qkv


def _qkv_out_to_hub(x_NO: np.ndarray, cfg: ModelConfig, layer: int) -> np.ndarray:
    """Rows of output features [N, K*(G+2)*E] group-major -> the Hub's order."""
    lay = layer_layout(cfg)[layer]
    n = x_NO.shape[0]
    x = x_NO.reshape(n, lay.kv_heads, lay.q_heads // lay.kv_heads + 2, cfg.head_dim)
    return qkv_to_hub_order(x).reshape(n, -1)


def _qkv_out_from_hub(x_NO: np.ndarray, cfg: ModelConfig, layer: int) -> np.ndarray:
    lay = layer_layout(cfg)[layer]
    n = x_NO.shape[0]
    x = x_NO.reshape(n, lay.q_heads + 2 * lay.kv_heads, cfg.head_dim)
    return qkv_from_hub_order(x, lay.q_heads, lay.kv_heads).reshape(n, -1)


def adapter_tensors(adapters: dict, model_cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The adapters as PEFT-named float32 tensors."""
    out = {}
    for i, per_layer in adapters.items():
        for t, ad in per_layer.items():
            key = f"{PREFIX}{i}.{HF_MODULES[t]}."
            a = np.asarray(ad["A"], np.float32)
            b_OR = np.asarray(ad["B"], np.float32)
            m = np.asarray(ad["m"], np.float32) if "m" in ad else None
            if t == "qkv":
                b_OR = _qkv_out_to_hub(b_OR.T, model_cfg, i).T
                m = None if m is None else _qkv_out_to_hub(m[None], model_cfg, i)[0]
            out[key + "lora_A.weight"] = np.ascontiguousarray(a)
            out[key + "lora_B.weight"] = np.ascontiguousarray(b_OR)
            if m is not None:
                out[key + "lora_magnitude_vector"] = np.ascontiguousarray(m)
    return out


def adapter_config(cfg: PeftConfig, base_name: str | None = None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [HF_MODULES[t].split(".")[1] for t in cfg.targets],
        "layers_to_transform": None if cfg.layers == "all" else sorted(cfg.layers),
        "layers_pattern": None if cfg.layers == "all" else "layers",
        "use_dora": cfg.method == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapters(path: str | Path, adapters: dict, cfg: PeftConfig, model_cfg: ModelConfig, *,
                  base_name: str | None = None) -> Path:
    """Write the adapter directory; the config file goes last, so a directory
    with ``adapter_config.json`` always has its weights."""
    path = Path(path)
    tensors = adapter_tensors(jax.device_get(adapters), model_cfg)
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_FILE, json.dumps(adapter_config(cfg, base_name), indent=1) + "\n")
    return path


def config_from_adapter(hf: dict, source: str) -> PeftConfig:
    """A PeftConfig from adapter_config.json, refusing what elmjax cannot apply."""
    if hf.get("peft_type") != "LORA":
        raise CheckpointError(f"{source}: peft_type {hf.get('peft_type')!r} is not supported (only LORA, with use_dora)")
    for key, ok in (("use_rslora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (need {ok!r})")
    if hf.get("rank_pattern") or hf.get("alpha_pattern"):
        raise CheckpointError(f"{source}: rank_pattern/alpha_pattern are not supported")
    modules = hf.get("target_modules")
    if isinstance(modules, str) or not modules:
        raise CheckpointError(f"{source}: target_modules must be a list among {list(_SHORT)}, got {modules!r}")
    unknown = [m for m in modules if m not in _SHORT]
    if unknown:
        raise CheckpointError(f"{source}: target_modules {unknown} are not OpenELM modules {list(_SHORT)}")
    layers = hf.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    try:
        return PeftConfig(method="dora" if hf.get("use_dora") else "lora", rank=int(hf["r"]),
                          alpha=float(hf.get("lora_alpha", 8)), dropout=float(hf.get("lora_dropout", 0.0)),
                          targets=tuple(_SHORT[m] for m in modules),
                          layers="all" if layers is None else tuple(int(i) for i in layers))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_adapters(path: str | Path, model_cfg: ModelConfig) -> tuple[dict, PeftConfig]:
    """(adapters, PeftConfig) from a PEFT-layout directory, shape-checked against ``model_cfg``."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CheckpointError(f"{f}: no such file (not a PEFT adapter directory)")
    hf = read_json(cfg_file)
    cfg = config_from_adapter(hf, str(cfg_file))
    try:
        layers = cfg.layer_indices(model_cfg.num_layers)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    with safe_open(str(weights), framework="numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    expected = _expected_shapes(cfg, model_cfg, layers)
    for k, v in tensors.items():
        if k not in expected:
            raise CheckpointError(f"{weights}: unexpected tensor '{k}' for {hf['target_modules']} on layers {list(layers)}")
        if tuple(v.shape) != expected[k]:
            raise CheckpointError(f"{weights}: '{k}' has shape {tuple(v.shape)}, expected {expected[k]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{weights}: missing tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    adapters: dict = {}
    for i in layers:
        for t in cfg.targets:
            key = f"{PREFIX}{i}.{HF_MODULES[t]}."
            b_OR = tensors[key + "lora_B.weight"].astype(np.float32)
            entry = {"A": tensors[key + "lora_A.weight"].astype(np.float32), "B": b_OR}
            if cfg.method == "dora":
                entry["m"] = tensors[key + "lora_magnitude_vector"].astype(np.float32)
            if t == "qkv":
                entry["B"] = _qkv_out_from_hub(b_OR.T, model_cfg, i).T
                if "m" in entry:
                    entry["m"] = _qkv_out_from_hub(entry["m"][None], model_cfg, i)[0]
            adapters.setdefault(i, {})[t] = {k: jnp.asarray(np.ascontiguousarray(v)) for k, v in entry.items()}
    return adapters, cfg


def _expected_shapes(cfg: PeftConfig, model_cfg: ModelConfig, layers) -> dict[str, tuple[int, ...]]:
    d, e = model_cfg.model_dim, model_cfg.head_dim
    out = {}
    for i in layers:
        lay = layer_layout(model_cfg)[i]
        io = {"qkv": (d, (lay.q_heads + 2 * lay.kv_heads) * e), "out": (lay.q_heads * e, d),
              "ffn_in": (d, (2 if model_cfg.ffn_with_glu else 1) * lay.ffn_dim), "ffn_out": (lay.ffn_dim, d)}
        for t in cfg.targets:
            n_in, n_out = io[t]
            key = f"{PREFIX}{i}.{HF_MODULES[t]}."
            out[key + "lora_A.weight"] = (cfg.rank, n_in)
            out[key + "lora_B.weight"] = (n_out, cfg.rank)
            if cfg.method == "dora":
                out[key + "lora_magnitude_vector"] = (n_out,)
    return out


def with_adapters(model, adapters: dict, cfg: PeftConfig):
    """A model whose weights are ``model``'s with the adapters applied (W' of
    ``elmjax.peft``); ``model`` is unchanged."""
    from elmjax.peft import merge

    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.replace_by_pure_dict(state, merge(params, adapters, cfg))
    return nnx.merge(graphdef, state)


def export_merged(model, adapters: dict, cfg: PeftConfig, path: str | Path, *, tokenizer=None,
                  dtype: str = "float32") -> Path:
    """Fold ``adapters`` into ``model``'s weights and write a Hub-layout
    OpenELM directory (``elmjax.hf_interop.save_pretrained``)."""
    from elmjax.hf_interop import save_pretrained

    return save_pretrained(with_adapters(model, adapters, cfg), path, tokenizer=tokenizer, dtype=dtype)
