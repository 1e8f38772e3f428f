"""The CPU's peak, measured: how many 512-bit int8 dot-product (``vpdpbusd``), 256-bit
``vpmaddubsw`` + ``vpaddw`` pairs (the AVX2 path's step) and float32 fused multiply-add
instructions one core retires per second, for ``bench --kernels``' roofline. Each loop
keeps 12 independent sums in registers (more than latency x ports), with no loads, so the
rate is the execution ports' limit.

One ``vpdpbusd`` does 64 multiply-adds (128 ops), one 16-lane FMA 16 (32 flops): per
instruction the int8 path does 4x the float32 work, so a kernel at 4x NumPy sgemm must
be as close to its peak as OpenBLAS is to its own. One ``vpmaddubsw`` + ``vpaddw`` pair
does 32 multiply-adds (64 ops).
"""

from __future__ import annotations

import time

import numba
import numpy as np

from tinyvit158.kernels import cpu_has
from tinyvit158.kernels.simd import (
    dpbusd,
    ffma,
    fload,
    fstore,
    fzero,
    vload,
    vstore,
    vzero,
    yload,
    ymaddubs16,
    ystore,
    yzero,
)


def _loop(step, zero, load, store, dtype):
    """A jitted loop of 12 independent ``step(sum, w, x)`` a pass; the sums are stored at
    the end so that nothing is optimized away. (Built per instruction, not cached.)"""

    @numba.njit
    def loop(a, n):
        w, x = load(a, 0), load(a, 64 // a.itemsize)
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = zero()
        for _ in range(n):
            c0, c1, c2, c3 = step(c0, w, x), step(c1, w, x), step(c2, w, x), step(c3, w, x)
            c4, c5, c6, c7 = step(c4, w, x), step(c5, w, x), step(c6, w, x), step(c7, w, x)
            c8, c9, c10, c11 = step(c8, w, x), step(c9, w, x), step(c10, w, x), step(c11, w, x)
        out = np.empty(16 * 12, dtype=dtype)
        for i, c in enumerate((c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11)):
            store(out, 16 * i, c)
        return out

    return loop


def _fma_step(c, w, x):
    return ffma(w, x, c)


def _maddubs_step(c, w, x):
    return ymaddubs16(c, c, x)  # c as the unsigned operand too: a product of loop constants would be hoisted


def _rate(fn, a, seconds: float) -> float:
    fn(a, 10)
    n, best = 200_000, 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn(a, n)
        best = max(best, 12 * n / (time.perf_counter() - t0))
        if time.perf_counter() > deadline:
            return best


_ONES_F32 = np.full(32, 1e-9, dtype=np.float32)
_ONES_U8 = np.ones(128, dtype=np.uint8)


OPS = {"fma": 32, "vpdpbusd": 128, "vpmaddubsw": 64}  # operations per instruction (pair)


def instruction_rates(seconds: float = 0.3) -> dict[str, float | None]:
    """Instructions per second on one core: ``fma`` (16-lane float32 FMA), ``vpdpbusd`` and
    ``vpmaddubsw`` (+ ``vpaddw``; None where the CPU lacks the VNNI or AVX2 path); the best
    of repeated runs (a shared machine only ever slows them)."""
    return {
        "fma": _rate(_loop(numba.njit(_fma_step), fzero, fload, fstore, np.float32), _ONES_F32, seconds),
        "vpdpbusd": _rate(_loop(dpbusd, vzero, vload, vstore, np.int32), _ONES_U8, seconds)
        if cpu_has("vnni")
        else None,
        "vpmaddubsw": _rate(_loop(numba.njit(_maddubs_step), yzero, yload, ystore, np.int32), _ONES_U8, seconds)
        if cpu_has("avx2")
        else None,
    }
