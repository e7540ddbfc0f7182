"""muP for per-layer widths: every width-dependent rule of ``model.parametrization: mup``.

The maximal update parametrization (Yang et al. 2022, "Tensor Programs V:
Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer",
arXiv 2203.03466) makes every layer's activations and their updates stay
the same size as width grows, so a learning rate tuned on a narrow model
transfers to a wide one. Its rules are per weight tensor and depend on that
tensor's own fan-in (TP5, Table 3; u-muP, Blake et al. 2024, "u-muP: The
Unit-Scaled Maximal Update Parametrization", arXiv 2407.17465, restates
them per weight type; elmjax does not adopt u-muP's unit scaling). OpenELM's layer-wise scaling gives every layer
its own head count and FFN width, so the fan-ins, and with them the
multipliers, differ from layer to layer.

Everything is relative to one base width b = ``model.mup_base_width``: at
model_dim = b and every fan-in = b, muP initialises and steps like standard
(up to the attention scale). With D = model_dim, E = head_dim, H_i and F_i
the query heads and FFN width of layer i, and N = num_layers:

==================  ==========  ======================  ======================  ==============
parameter           fan-in      init std (standard)     init std (muP)          AdamW lr mult.
==================  ==========  ======================  ======================  ==============
qkv_DKCE (layer i)  D           D^-1/2                  D^-1/2                  b / D
out_KGED (layer i)  H_i * E     D^-1/2 (2N)^-1/2        (H_i E)^-1/2 (2N)^-1/2  b / (H_i E)
in_DPF   (layer i)  D           D^-1/2                  D^-1/2                  b / D
out_FD   (layer i)  F_i         D^-1/2 (2N)^-1/2        F_i^-1/2 (2N)^-1/2      b / F_i
embed_VD (input)    V (1-hot)   D^-1/2                  b^-1/2                  1
head_DV (untied)    D           D^-1/2                  b^1/2 / D               b / D
norm gains          1           1 (ones)                1 (ones)                1
==================  ==========  ======================  ======================  ==============

and, in the forward pass under muP:

* attention scale 1/E instead of 1/sqrt(E) (TP5: q and k become correlated
  during training, so q.k grows like E, not sqrt(E));
* tied embeddings: logits multiplied by b / D. The embedding is an input
  weight (init constant in width, lr multiplier 1), and the readout that
  shares it gets the 1/fan-in output multiplier in the forward pass, as the
  mup library's ``MuSharedReadout`` does;
* untied head: no logit multiplier; the head follows TP5 Table 3's output
  weight rule instead (init variance and Adam lr proportional to 1/fan_in^2
  and 1/fan_in). With Adam this is the same training as a head with init std
  b^-1/2, lr multiplier 1 and logit multiplier b / D, up to Adam's eps and
  weight decay.

The depth factor (2N)^-1/2 on the two projections that write into the
residual stream is OpenELM's, kept under both parametrizations. Weight decay:
the multiplier scales AdamW's whole update, decoupled decay included (a
matrix with lr multiplier m decays by lr * m * weight_decay per step), as
PyTorch's AdamW does with one parameter group per learning rate.

Which module reads what: ``elmjax.model`` takes the init stds, the attention
scale and the logit multiplier from here (they define the architecture);
``elmjax.optim.make_optimizer`` applies ``lr_multipliers`` (None under
standard: the optimizer is then exactly the one before muP existed); and
``elmjax.hf_interop`` folds the forward multipliers into the weights on export.
No JAX arrays are made here: functions of the config and of parameter shapes.
"""

from __future__ import annotations

import math

import jax

from elmjax.model_config import ModelConfig

# Hidden matrices by parameter name -> leading axes that form the fan-in
# (the contracted axes of the forward matmul, in elmjax's layout).
HIDDEN_IN_AXES = {"qkv_DKCE": 1, "out_KGED": 3, "in_DPF": 1, "out_FD": 1}
# The two projections that write into the residual stream get the depth factor.
RESIDUAL_OUTPUTS = ("out_KGED", "out_FD")


def is_mup(cfg: ModelConfig) -> bool:
    return cfg.parametrization == "mup"


def attention_scale(cfg: ModelConfig) -> float:
    """Softmax scale on q.k: 1/head_dim under muP, 1/sqrt(head_dim) (OpenELM's) otherwise."""
    return 1.0 / cfg.head_dim if is_mup(cfg) else cfg.head_dim**-0.5


def logit_multiplier(cfg: ModelConfig) -> float:
    """Factor on the logits: b / model_dim for a muP tied readout, else 1."""
    if is_mup(cfg) and cfg.tie_embeddings:
        return cfg.mup_base_width / cfg.model_dim
    return 1.0


def hidden_init_std(cfg: ModelConfig, fan_in: int, residual_output: bool) -> float:
    """Init std of a hidden matrix with ``fan_in`` inputs (``residual_output``: out_KGED / out_FD)."""
    std = fan_in**-0.5 if is_mup(cfg) else cfg.model_dim**-0.5
    return std * (2 * cfg.num_layers) ** -0.5 if residual_output else std


def embed_init_std(cfg: ModelConfig) -> float:
    """Token embedding: constant in width under muP (equal to standard at model_dim = b)."""
    return cfg.mup_base_width**-0.5 if is_mup(cfg) else cfg.model_dim**-0.5


def head_init_std(cfg: ModelConfig) -> float:
    """Untied output head: TP5's output rule, std proportional to 1/fan_in (= standard at model_dim = b)."""
    return cfg.mup_base_width**0.5 / cfg.model_dim if is_mup(cfg) else cfg.model_dim**-0.5


# ------------------------------------------------------------ per parameter


def _name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def kind(path) -> str:
    """'hidden', 'embedding' (input), 'readout' (untied head) or 'gain' (norm weights) for a tree path."""
    name = _name(path)
    if name in HIDDEN_IN_AXES:
        return "hidden"
    if name == "embed_VD":
        return "embedding"
    if name == "head_DV":
        return "readout"
    if name == "weight":
        return "gain"
    raise ValueError(f"elmjax.mup: no muP rule for parameter {jax.tree_util.keystr(path)}")


def fan_in(path, shape: tuple[int, ...]) -> int:
    """Inputs feeding one output coordinate: contracted axes for matrices, the
    vocabulary for the (one-hot fed) embedding, 1 for norm gains."""
    k = kind(path)
    if k == "hidden":
        return math.prod(shape[:HIDDEN_IN_AXES[_name(path)]])
    if k in ("embedding", "readout"):
        return shape[0]  # [V, D] fed one-hot tokens; [D, V] fed the hidden state
    return 1


def fan_ins(params) -> object:
    """The tree of ``params`` (a pure dict of arrays or ShapeDtypeStructs) with each leaf's fan-in."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fan_in(p, tuple(x.shape)), params)


def lr_multiplier(cfg: ModelConfig, path, shape: tuple[int, ...]) -> float:
    """AdamW lr multiplier of one parameter under muP (see the module table)."""
    k = kind(path)
    if k in ("hidden", "readout"):
        return cfg.mup_base_width / fan_in(path, shape)
    return 1.0  # embedding and gains: width-independent (TP5's input weights and biases)


def lr_multipliers(cfg: ModelConfig, params) -> object | None:
    """Per-leaf AdamW lr multipliers for ``params`` (same tree), or None under the standard parametrization."""
    if not is_mup(cfg):
        return None
    return jax.tree_util.tree_map_with_path(lambda p, x: lr_multiplier(cfg, p, tuple(x.shape)), params)
