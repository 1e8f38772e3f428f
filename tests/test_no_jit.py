"""The engine also runs as plain Python (NUMBA_DISABLE_JIT=1, for debugging a kernel line
by line): the vector intrinsics are compiled-only, so every helper that uses them takes a
NumPy branch there and the kernels fall back to their references."""

import json
import os
import subprocess
import sys

import numpy as np

from tinyvit158.config import get_preset
from tinyvit158.engine import Engine
from tinyvit158.weights import random_checkpoint

CODE = """
import json, numpy as np
from tinyvit158.config import get_preset
from tinyvit158.engine import Engine
from tinyvit158.weights import random_checkpoint
cfg = get_preset("cifar10-tiny").replace(depth=1, dim=48, heads=3, mlp_ratio=2.0)
x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
print(json.dumps(Engine(random_checkpoint(cfg, seed=0))(x).tolist()))
"""


def test_engine_runs_without_the_jit():
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    plain = np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32)
    cfg = get_preset("cifar10-tiny").replace(depth=1, dim=48, heads=3, mlp_ratio=2.0)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    jitted = Engine(random_checkpoint(cfg, seed=0))(x)
    # the same arithmetic up to float32 summation order (LayerNorm sums, attention):
    # no int8 code sits at a rounding tie for these inputs, so the logits agree closely
    np.testing.assert_allclose(plain, jitted, rtol=0, atol=1e-5 * np.abs(jitted).max())


INTEGER = """
import json, numpy as np
from tinyvit158.config import get_preset
from tinyvit158.engine import Engine
from tinyvit158.weights import random_checkpoint
cfg = get_preset("cifar10-tiny").replace(depth=1, dim=48, heads=3, mlp_ratio=2.0, numerics="integer", attention="int8")
x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
print(json.dumps(Engine(random_checkpoint(cfg, seed=0)).integers(x).tolist()))
"""


def test_integer_numerics_run_without_the_jit_and_give_the_same_integers():
    from tinyvit158.integer import IntegerOracle

    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", INTEGER], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    plain = np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.int64)
    cfg = get_preset("cifar10-tiny").replace(
        depth=1, dim=48, heads=3, mlp_ratio=2.0, numerics="integer", attention="int8"
    )
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(
        plain, IntegerOracle(random_checkpoint(cfg, seed=0)).integers(x)
    )  # exact, as plain Python too
