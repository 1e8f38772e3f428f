"""Hypothesis strategies, named by the shape letters of what they draw.

T tokens, K input features, N output features. Big arrays are drawn as a seed plus a
"pattern" (including the extremes), which keeps drawing fast; small arrays are drawn
element by element so Hypothesis can shrink them.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

PATTERNS = ("random", "all_max", "all_min", "zero_rows", "zero_weight_rows", "sparse_weights", "alternating")


def ternary_NK(n: int, k: int, rng: np.random.Generator, pattern: str = "random") -> np.ndarray:
    w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    if pattern == "zero_weight_rows":
        w[rng.random(n) < 0.5] = 0
    elif pattern == "sparse_weights":
        w[rng.random((n, k)) < 0.9] = 0
    elif pattern in ("all_max", "all_min"):
        w[:] = 1 if pattern == "all_max" else -1  # worst case for |acc|: 127 * K
    return w


def int8_TK(t: int, k: int, rng: np.random.Generator, pattern: str = "random") -> np.ndarray:
    x = rng.integers(-127, 128, size=(t, k)).astype(np.int8)
    if pattern == "all_max":
        x[:] = 127
    elif pattern == "all_min":
        x[:] = -127
    elif pattern == "zero_rows":
        x[rng.random(t) < 0.5] = 0
    elif pattern == "alternating":
        x[:] = np.where(np.arange(k) % 2, 127, -127)
    return x


@st.composite
def int8_TK_ternary_NK(draw, max_t: int = 33, max_k: int = 1100, max_n: int = 1100):
    """(x_q int8 (T, K), w int8 (N, K) in {-1, 0, 1}) with odd/even, small and ~1000 sides."""
    side = st.one_of(st.integers(1, 9), st.integers(10, 200), st.integers(900, 1100))
    t = draw(st.integers(1, max_t))
    k = min(draw(side), max_k)
    n = min(draw(side), max_n)
    pattern = draw(st.sampled_from(PATTERNS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return int8_TK(t, k, rng, pattern), ternary_NK(n, k, rng, pattern)


@st.composite
def small_int8_TK_ternary_NK(draw):
    """Element-wise drawn small operands, shrinkable to a minimal failing case."""
    t, k, n = draw(st.integers(1, 5)), draw(st.integers(1, 12)), draw(st.integers(1, 9))
    x = draw(npst.arrays(np.int8, (t, k), elements=st.integers(-127, 127)))
    w = draw(npst.arrays(np.int8, (n, k), elements=st.integers(-1, 1)))
    return x, w


def float_TK(dtype=np.float64, max_t: int = 6, max_k: int = 40):
    """Float activations (T, K), bounded, with zero rows and exact ties possible."""
    return npst.arrays(
        dtype,
        npst.array_shapes(min_dims=2, max_dims=2, max_side=max(max_t, max_k)).filter(
            lambda s: s[0] <= max_t and s[1] <= max_k
        ),
        elements=st.one_of(
            st.floats(-1e4, 1e4, allow_nan=False, width=np.dtype(dtype).itemsize * 8),
            st.sampled_from([0.0, 0.5, -0.5, 1.5, -2.5, 127.0]),
        ),
    )


def ternary_NK_strategy(max_n: int = 8, max_k: int = 300):
    """Ternary matrices (N, K) with K from 1 (not multiples of 4 or 5 included)."""
    return st.tuples(st.integers(1, max_n), st.integers(1, max_k), st.integers(0, 2**32 - 1)).map(
        lambda a: np.random.default_rng(a[2]).integers(-1, 2, size=(a[0], a[1])).astype(np.int8)
    )
