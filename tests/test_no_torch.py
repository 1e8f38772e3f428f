import subprocess
import sys

CODE = """
import sys
import numpy as np
import tinyvit158
from tinyvit158.config import get_preset
from tinyvit158.engine import Engine
from tinyvit158.weights import random_checkpoint
engine = Engine(random_checkpoint(get_preset("cifar10-tiny").replace(depth=1)))
engine(np.zeros((1, 3, 32, 32), np.float32))
assert "torch" not in sys.modules, "the engine imported torch"
print("ok")
"""


def test_engine_never_imports_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
