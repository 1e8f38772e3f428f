"""Shared fixtures and Hypothesis profiles.

Profiles: ``ci`` (modest example counts, no deadline: Numba compiles on first call) is
chosen when the CI variable is set; ``dev`` otherwise; ``thorough`` by
``HYPOTHESIS_PROFILE=thorough`` for a long local run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def run_module(module: str, *args, timeout: int = 600):
    """``python -m MODULE ARGS`` from the repository root, output captured."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A small random cifar10-tiny-shaped weight file (depth 1)."""
    from tinyvit158 import get_preset
    from tinyvit158.weights import random_checkpoint, save_weights

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(path, random_checkpoint(get_preset("cifar10-tiny").replace(depth=1), seed=2))
    return path


@pytest.fixture(scope="session")
def cifar_tarball(tmp_path_factory):
    """A tiny CIFAR-10 look-alike in the official python layout (10 + 6 images a class)."""
    from fake_cifar import make_images, write_tarball

    root = tmp_path_factory.mktemp("cifar")
    return write_tarball(root / "cifar-10-python.tar.gz", make_images(10, 0), make_images(6, 1))


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test (its CPU kernels are deterministic for a fixed count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
