"""Kernels that own whole output rows: a ternary linear layer and the step after it, in one pass.

Each job takes an equal share of the row tiles (one job per thread) and, 64 rows at a
time, computes every output channel of those rows with the VNNI tile (``vnni._tile``),
then finishes the rows while they are in cache:

- :func:`linear_gelu_quantize`: fc1, GELU, and the int8 codes fc2 takes; the float32
  hidden layer of the MLP never goes to memory (at batch 64 of cifar10-tiny, 12.8 MB
  written and read back per block);
- :func:`linear_add_norm_quantize`: proj or fc2 added to the residual stream in place,
  then the next LayerNorm and its quantizer: the codes of the next linear layer.

With :func:`ops.attention_quantize` a transformer block is 5 parallel regions instead of
9 (batch 1: each region costs ~3 us to start, plus a Python call). Each kernel is
bit-identical to its steps run one after the other (tests); on the generic path, and for
widths that are not a multiple of 48, the wrappers run those steps.
"""

from __future__ import annotations

import numba
import numpy as np

from tinyvit158.kernels import vnni
from tinyvit158.kernels.ops import (
    _PYTHON,
    _check_norm,
    _codes_out,
    _gelu_row,
    _layernorm_row,
    _pjit,
    _quantize_row,
    _quantize_with,
    gelu_quantize,
    layernorm_quantize,
)
from tinyvit158.kernels.simd import _dequant_store
from tinyvit158.kernels.ternary import PreparedTernary, _check_sx, _check_x, check_out, kernel_path, linear

GELU, ADD_NORM = 1, 2  # what a job does with its rows once they are computed


@_pjit
def _linear_rows(x, wl, K, T, N, packed, parts, s_x, scale, bias, has_bias, mode, res, gamma, beta, eps, q, s):
    """Rows of ``linear(x)`` (T, N), then per row: GELU (``mode == GELU``, rows in a job
    buffer) or add to ``res`` (flat T * N, in place) and LayerNorm (``ADD_NORM``); then
    int8 codes into ``q`` (T, N) and scales into ``s``. Needs N % 48 == 0."""
    MR, NV, NC = vnni.MR, vnni.NV, vnni.NC
    G = K // 4
    NB = N // NC
    RB = (T + MR - 1) // MR
    RG = vnni.RT * MR  # rows a pass: their outputs (fc1: 192 kB) stay in L2
    for p in numba.prange(parts):
        w = vnni._all_weights(wl, NB, G, packed)  # every block, spread to bytes once a job
        sums = np.empty(RG, dtype=np.int32)
        buf = np.empty(RG * N if mode == GELU else 0, dtype=np.float32)
        row = np.empty(N, dtype=np.float32)
        b0, b1 = p * RB // parts, (p + 1) * RB // parts
        for c0 in range(b0, b1, vnni.RT):
            r0, r1 = c0 * MR, min(min(c0 + vnni.RT, b1) * MR, T)
            vnni._rowsums(x, K, r0, r1, sums)
            for nb in range(NB):
                for t0 in range(r0, r1, MR):
                    tile = vnni._tile(x, w, G, K, t0, T, nb)
                    for r in range(min(MR, T - t0)):
                        t = t0 + r
                        for v in range(NV):
                            n = nb * NC + 16 * v
                            a = tile[r * NV + v]
                            if mode == GELU:
                                o = (t - r0) * N + n
                                _dequant_store(buf, o, a, sums[t - r0], s_x[t], scale, n, bias, has_bias, False)
                            else:
                                _dequant_store(res, t * N + n, a, sums[t - r0], s_x[t], scale, n, bias, has_bias, True)
            for t in range(r0, r1):
                if mode == GELU:
                    h = buf[(t - r0) * N : (t - r0 + 1) * N]
                    s[t] = _quantize_with(h, q[t], _gelu_row(h, h))
                else:
                    _layernorm_row(res[t * N : (t + 1) * N], gamma, beta, eps, row)
                    s[t] = _quantize_row(row, q[t])


_NONE = np.empty(0, dtype=np.float32)


def _fused(w: PreparedTernary) -> bool:
    return kernel_path() == "vnni" and w.out_features % vnni.NC == 0 and not _PYTHON


def bind(x_q, s_x, w: PreparedTernary, mode, res, gamma, beta, eps, q, s):
    """``(kernel, args)`` of the one-pass kernel (``mode`` GELU or ADD_NORM), bound to these
    arrays, for a caller that repeats it (the engine's plan; see ``vnni.bind_linear``)."""
    x, K = vnni._prepared(x_q, w.vnni)
    T, N, parts = x_q.shape[0], w.out_features, numba.get_num_threads()
    args = (x, w.vnni.wl, K, T, N, w.vnni.packed, parts, s_x, w.scale, *w.bias_args, mode, res, gamma, beta, eps, q, s)
    return _linear_rows, args


def _run(x_q, s_x, w: PreparedTernary, mode, res, gamma, beta, eps, q, s):
    fn, args = bind(x_q, s_x, w, mode, res, gamma, beta, eps, q, s)
    fn(*args)
    return q, s


def linear_gelu_quantize(x_q: np.ndarray, s_x: np.ndarray, w: PreparedTernary, out=None):
    """``gelu_quantize(linear(x_q, s_x, w))``, bit-identical, in one pass on the VNNI path:
    int8 codes (T, N) and float32 scales (T,), into ``out`` (a (codes, scales) pair) when given."""
    x_q = _check_x(x_q, w)
    s_x = _check_sx(s_x, x_q)
    q, s = _codes_out((x_q.shape[0], w.out_features), out)
    if not _fused(w):
        return gelu_quantize(linear(x_q, s_x, w), (q, s))
    return _run(x_q, s_x, w, GELU, _NONE, _NONE, _NONE, 0.0, q, s)


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
    gamma, beta, eps)``: bit-identical to the two calls, in one pass on the VNNI path.

    Returns int8 codes and float32 scales of the normalized rows (into ``out`` when given);
    ``residual`` (C-contiguous float32 (T, N)) holds the sum afterwards."""
    x_q = _check_x(x_q, w)
    s_x = _check_sx(s_x, x_q)
    shape = (x_q.shape[0], w.out_features)
    residual = check_out(residual, shape, np.float32, "residual")
    residual, gamma, beta = _check_norm(residual, gamma, beta)
    q, s = _codes_out(shape, out)
    if not _fused(w):
        linear(x_q, s_x, w, residual=residual)
        return layernorm_quantize(residual, gamma, beta, eps, (q, s))
    return _run(x_q, s_x, w, ADD_NORM, residual.reshape(-1), gamma, beta, float(eps), q, s)
