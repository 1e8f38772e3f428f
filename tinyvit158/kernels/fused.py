"""fc1 and the step after it in one pass over whole output rows; residual + LayerNorm as two.

:func:`linear_gelu_quantize`: each job takes an equal share of the row tiles (one job per
thread) and, 64 rows at a time, computes every output channel of those rows with the VNNI
tile (``vnni._tile``), then their GELU and the int8 codes fc2 takes while they are in
cache: the float32 hidden layer of the MLP never goes to memory (at batch 64 of
cifar10-tiny, 12.8 MB written and read back per block). Bit-identical to its steps run one
after the other (tests); on the generic path, and for widths that are not a multiple of
48, it runs those steps.

:func:`linear_add_norm_quantize` (proj or fc2 added to the residual stream in place, then
the next LayerNorm and its codes) is the two kernels ``linear(..., residual=)`` and
``layernorm_quantize``: one pass measured slower from 197 rows up, its LayerNorm rows
inside the matmul's loop running slower than alone (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import numba
import numpy as np

from tinyvit158.kernels import vnni
from tinyvit158.kernels.ops import (
    _PYTHON,
    _codes_out,
    _gelu_row,
    _pjit,
    _quantize_with,
    gelu_quantize,
    layernorm_quantize,
)
from tinyvit158.kernels.ternary import PreparedTernary, _check_sx, _check_x, kernel_path, linear


@_pjit
def _linear_rows(x, wl, K, T, N, packed, parts, s_x, scale, bias, has_bias, q, s):
    """Rows of ``linear(x)`` (T, N) into a job buffer, then per row GELU and the int8 codes
    into ``q`` (T, N) and scales into ``s``. Needs N % 48 == 0."""
    MR, NV, NC = vnni.MR, vnni.NV, vnni.NC
    G = K // 4
    NB = N // NC
    RB = (T + MR - 1) // MR
    RG = vnni.RT * MR  # rows a pass: their outputs (fc1: 192 kB) stay in L2
    for p in numba.prange(parts):
        w = vnni._all_weights(wl, NB, G, packed)  # every block, spread to bytes once a job
        sums = np.empty(RG, dtype=np.int32)
        buf = np.empty(RG * N, dtype=np.float32)
        b0, b1 = p * RB // parts, (p + 1) * RB // parts
        for c0 in range(b0, b1, vnni.RT):
            r0, r1 = c0 * MR, min(min(c0 + vnni.RT, b1) * MR, T)
            vnni._rowsums(x, K, r0, r1, sums)
            for nb in range(NB):
                for t0 in range(r0, r1, MR):
                    if T - t0 <= vnni.SHORT:  # a last tile of 1 or 2 rows: one row at a time
                        for t in range(t0, T):
                            a0, a1, a2 = vnni._tile1(x, w, G, K, t, nb)
                            n = nb * NC
                            vnni._store3(buf, (t - r0) * N + n, a0, a1, a2, sums[t - r0], s_x[t], scale, n, bias,
                                         has_bias, False)  # fmt: skip
                        continue
                    tile = vnni._tile(x, w, G, K, t0, T, nb)
                    for r in range(min(MR, T - t0)):
                        t, n = t0 + r, nb * NC
                        a0, a1, a2 = tile[r * NV], tile[r * NV + 1], tile[r * NV + 2]
                        vnni._store3(buf, (t - r0) * N + n, a0, a1, a2, sums[t - r0], s_x[t], scale, n, bias,
                                     has_bias, False)  # fmt: skip
            for t in range(r0, r1):
                h = buf[(t - r0) * N : (t - r0 + 1) * N]
                s[t] = _quantize_with(h, q[t], _gelu_row(h, h))


def _fused(w: PreparedTernary) -> bool:
    return kernel_path() == "vnni" and w.out_features % vnni.NC == 0 and not _PYTHON


def bind(x_q, s_x, w: PreparedTernary, q, s):
    """``(kernel, args)`` of the one-pass fc1 + GELU + codes kernel, bound to these arrays,
    for a caller that repeats it (the engine's plan; see ``vnni.bind_linear``)."""
    x, K = vnni._prepared(x_q, w.vnni)
    T, N, parts = x_q.shape[0], w.out_features, numba.get_num_threads()
    return _linear_rows, (x, w.vnni.wl, K, T, N, w.vnni.packed, parts, s_x, w.scale, *w.bias_args, q, s)


def linear_gelu_quantize(x_q: np.ndarray, s_x: np.ndarray, w: PreparedTernary, out=None):
    """``gelu_quantize(linear(x_q, s_x, w))``, bit-identical, in one pass on the VNNI path:
    int8 codes (T, N) and float32 scales (T,), into ``out`` (a (codes, scales) pair) when given."""
    x_q = _check_x(x_q, w)
    s_x = _check_sx(s_x, x_q)
    q, s = _codes_out((x_q.shape[0], w.out_features), out)
    if not _fused(w):
        return gelu_quantize(linear(x_q, s_x, w), (q, s))
    fn, args = bind(x_q, s_x, w, q, s)
    fn(*args)
    return q, s


def linear_add_norm_quantize(
    x_q: np.ndarray,
    s_x: np.ndarray,
    w: PreparedTernary,
    residual: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float,
    out=None,
):
    """``residual += linear(x_q, s_x, w)`` in place, then ``layernorm_quantize(residual,
    gamma, beta, eps)`` (two kernels: the module docstring says why).

    Returns int8 codes and float32 scales of the normalized rows (into ``out`` when given);
    ``residual`` (C-contiguous float32 (T, N)) holds the sum afterwards."""
    residual = linear(x_q, s_x, w, residual=residual)  # checks the inputs and the residual
    return layernorm_quantize(residual, gamma, beta, eps, out)
