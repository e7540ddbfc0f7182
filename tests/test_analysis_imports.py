"""The analysis package never imports JAX, directly or through elmjax."""

import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_analysis_module_imports_jax():
    modules = sorted(f"analysis.{m.name}" for m in pkgutil.iter_modules([str(REPO / "analysis")]))
    assert {"analysis.load", "analysis.fits", "analysis.report", "analysis.plots"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import analysis\n"
        "for name in analysis.__all__:\n"  # the lazy top-level names resolve too
        "    getattr(analysis, name)\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax', 'optax')))\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n"
    )
    # Run from the checkout so this analysis package is the one imported.
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
