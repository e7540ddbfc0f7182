"""elmjax: OpenELM-style language models in JAX/Flax NNX for scaling studies.

Attributes are imported lazily so that the layout math (``elmjax.layout``),
the configs and the analysis package never pull in JAX.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "elmjax.model_config",
    "PRESETS": "elmjax.model_config",
    "preset": "elmjax.model_config",
    "layer_layout": "elmjax.layout",
    "param_counts": "elmjax.layout",
    "LayerLayout": "elmjax.layout",
    "OpenELM": "elmjax.model",
    "from_pretrained": "elmjax.hf_interop",
    "save_pretrained": "elmjax.hf_interop",
    "generate": "elmjax.generate",
    "load_model": "elmjax.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # Submodules on first use, so ``import elmjax; elmjax.checkpoint.load_model(...)`` works.
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'elmjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
