"""elmjax.tb_log: TensorBoard scalars without importing PyTorch."""

import importlib.util
import subprocess
import sys

import pytest

SCRIPT = """
import sys
{before}
from elmjax import tb_log
w = tb_log.open_writer(sys.argv[1])
w.add_scalar("loss", 2.5, 7)
w.flush()
w.close()
print("torch imported:", "torch" in sys.modules and sys.modules["torch"] is not None)
print("scalars:", tb_log.scalars(sys.argv[1] + "/tb"))
import torch  # still importable afterwards
print("torch after:", torch.__name__)
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed here")
@pytest.mark.parametrize("torch_first", [False, True])
def test_the_scalar_writer_does_not_import_pytorch(tmp_path, torch_first):
    """tensorboardX imports PyTorch when it is installed (1.6 s of each run's start-up); the writer refuses it
    for the import and leaves it importable, and an already imported PyTorch alone."""
    before = "import torch" if torch_first else ""
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(before=before), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"torch imported: {torch_first}"
    assert lines[1] == "scalars: {'loss': [(7, 2.5)]}"
    assert lines[2] == "torch after: torch"
