"""What ``import elmjax`` gives a user: the documented entry points, lazily."""

import subprocess
import sys


def test_load_model_after_a_plain_import_elmjax(tmp_path):
    # A fresh interpreter: only `import elmjax`, then the two documented spellings.
    code = f"""
import sys
import elmjax
assert "jax" not in sys.modules, "import elmjax must stay light"
from elmjax.model_config import ModelConfig
from elmjax.model import OpenELM
from flax import nnx
elmjax.save_pretrained(OpenELM(ModelConfig(num_layers=1, model_dim=32, head_dim=16, num_gqa_groups=1,
                                           ffn_dim_divisor=16), rngs=nnx.Rngs(0)), {str(tmp_path)!r})
a = elmjax.checkpoint.load_model({str(tmp_path)!r})
b = elmjax.load_model({str(tmp_path)!r})
assert a.cfg == b.cfg and a.cfg.model_dim == 32
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
