"""The kernel paths every kernel and engine test runs on: the generic kernel, and the AVX2
and VNNI kernels with 1-byte and with 2-bit weights, each skipped, saying why, on a CPU
without its instructions."""

import pytest

from tinyvit158.kernels import PATH_FEATURES, PATHS, cpu_has

NAMES = [*PATHS, "avx2-packed", "vnni-packed"]


def kernel(name: str) -> tuple[str, bool]:
    """(kernel path, packed weights) of a path name."""
    return name.removesuffix("-packed"), name.endswith("-packed")


def _param(name: str):
    path = kernel(name)[0]
    why = f"CPU lacks {', '.join(PATH_FEATURES[path])} (or the JIT is off)"
    return pytest.param(name, marks=pytest.mark.skipif(not cpu_has(path), reason=why))


KERNEL_PATHS = [_param(n) for n in NAMES]
