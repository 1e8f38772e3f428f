"""The kernel paths every kernel and engine test runs on: the generic kernel, and the VNNI
kernel with 1-byte and with 2-bit weights, marked so a CPU without VNNI says why it skipped."""

import pytest

from tinyvit158.kernels import PATHS, cpu_has_vnni

NAMES = [*PATHS, "vnni-packed"]
KERNEL_PATHS = [
    pytest.param(p, marks=pytest.mark.skipif(p != "generic" and not cpu_has_vnni(), reason="CPU lacks AVX-512 VNNI"))
    for p in NAMES
]


def kernel(name: str) -> tuple[str, bool]:
    """(kernel path, packed weights) of a path name."""
    return name.removesuffix("-packed"), name.endswith("-packed")
