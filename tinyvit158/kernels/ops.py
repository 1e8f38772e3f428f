"""The float32 steps between the ternary matmuls, each fused with the quantizer it feeds.

Every function returns float32 (or int8 codes plus float32 scales). Row statistics
(LayerNorm mean and variance) are accumulated in float64 and rounded once to float32: on
2 cores this costs nothing measurable and halves the engine's distance to the float64
oracle. GELU's erf is a float32 rational function (``_erf``, |error| <= 4.2e-7), 16 lanes
at a time. The quantizer is bit-identical to ``quant.quantize_activations`` on
float32 input (same float32 operations in the same order, no fastmath), so
``layernorm_quantize(x) == quantize_activations(layernorm(x))`` exactly.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tinyvit158.errors import TinyViTError
from tinyvit158.kernels.simd import (
    _fabs,
    _fadd,
    _fbcast,
    _fdiv,
    _fexp_nonpositive,
    _ffma,
    _fhmax,
    _fhsum,
    _fload,
    _fmask_from,
    _fmax,
    _fmin,
    _fmul,
    _fquantize_store,
    _fsplat,
    _fstore,
    _fsub,
    _ftranspose16,
    _fzero,
)
from tinyvit158.kernels.ternary import check_out
from tinyvit158.quant import ACT_EPS, ACT_QMAX

# error_model="numpy": a float division by zero gives inf instead of raising, which removes
# the check that keeps LLVM from vectorizing every loop holding a division (GELU ran 3.2x
# faster). No fastmath anywhere: every result is the IEEE one, in a documented order.
_jit = numba.njit(cache=True, error_model="numpy")
_pjit = numba.njit(cache=True, error_model="numpy", parallel=True)
# Under NUMBA_DISABLE_JIT=1 the vector intrinsics cannot run as Python: each helper that
# uses them takes a plain NumPy branch instead (in compiled code the branch is dead).
_PYTHON = bool(numba.config.DISABLE_JIT)
_EPS32 = np.float32(ACT_EPS)
_QMAX32 = np.float32(ACT_QMAX)
_INV_SQRT2_32 = np.float32(1.0 / math.sqrt(2.0))


def _parts(units: int) -> int:
    """Parallel jobs for ``units`` rows (or other units of work): one per thread, each
    kernel giving job p the units ``[p U / P, (p + 1) U / P)``. Numba schedules a prange
    statically, so equal shares keep both cores busy: at batch 1 (65 rows), fixed 16-row
    jobs gave one core 48 rows and the other 17. (Passed in: a jitted call of
    ``numba.get_num_threads`` would keep the kernel out of Numba's cache.)"""
    return max(1, min(units, numba.get_num_threads()))


def _f32_2d(x: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise TinyViTError(
            f"{what} expects float32 of shape (tokens, features), found "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    return np.ascontiguousarray(x)


@_jit
def _absmax(row):
    """max |row|, 16 lanes at a time in a zmm register (max is exact in any order)."""
    if _PYTHON:
        return np.float32(np.abs(row).max(initial=0.0))
    n = row.shape[0]
    n16 = n - n % 16
    mv = _fzero()
    for k in range(0, n16, 16):
        mv = _fmax(mv, _fabs(_fload(row, k)))
    m = _fhmax(mv)
    for k in range(n16, n):
        a = abs(row[k])
        m = a if a > m else m
    return m


@_jit
def _quantize_row(row, q):
    """Absmax int8 quantization of one float32 row into ``q``; returns the scale."""
    return _quantize_with(row, q, _absmax(row))


@_jit
def _quantize_with(row, q, absmax):
    """:func:`_quantize_row` given the row's largest magnitude (from the pass that wrote it)."""
    s = max(absmax, _EPS32) / _QMAX32
    n = row.shape[0]
    n16 = 0 if _PYTHON else n - n % 16
    if n16:
        s_v, qmax_v = _fsplat(s), _fsplat(_QMAX32)
        for k in range(0, n16, 16):
            _fquantize_store(q, k, _fload(row, k), s_v, qmax_v)
    for k in range(n16, n):
        r = np.rint(row[k] / s)
        q[k] = np.int8(min(max(r, -_QMAX32), _QMAX32))
    return s


@_pjit
def _quantize_rows(x, q, s, P):
    T, K = x.shape
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            s[t] = _quantize_row(x[t], q[t])
    return q, s


def _codes_out(shape: tuple[int, int], out) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) arrays for ``shape`` (T, K) rows: ``out`` checked, or new ones."""
    q, s = out if out is not None else (None, None)
    return check_out(q, shape, np.int8, "codes"), check_out(s, shape[:1], np.float32, "scales")


def quantize_rows(x: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None):
    """Per-token absmax int8 quantizer, bit-identical to ``quant.quantize_activations``.

    Returns (int8 codes (T, K), float32 scales (T,)), written into ``out`` when given."""
    x = _f32_2d(x, "quantize_rows")
    return _quantize_rows(x, *_codes_out(x.shape, out), _parts(x.shape[0]))


@_jit
def _sum16(row, shift):
    """sum(row - shift): 16 float32 partial sums in a zmm register (each over n / 16 values),
    added up in float64."""
    if _PYTHON:
        return np.sum(row.astype(np.float64) - shift)
    n = row.shape[0]
    n16 = n - n % 16
    sv = _fzero()
    shift_v = _fsplat(np.float32(shift))
    for k in range(0, n16, 16):
        sv = _fadd(sv, _fsub(_fload(row, k), shift_v))
    total = np.float64(_fhsum(sv))
    for k in range(n16, n):
        total += np.float64(row[k]) - shift
    return total


@_jit
def _sumsq16(row, mean):
    """sum((row - mean)**2) with 16 float32 partial sums (mean is subtracted first, so the
    squares carry no cancellation)."""
    if _PYTHON:
        return np.sum((row.astype(np.float64) - mean) ** 2)
    n = row.shape[0]
    n16 = n - n % 16
    sv = _fzero()
    mean_v = _fsplat(np.float32(mean))
    for k in range(0, n16, 16):
        d = _fsub(_fload(row, k), mean_v)
        sv = _ffma(d, d, sv)
    total = np.float64(_fhsum(sv))
    for k in range(n16, n):
        d = np.float64(row[k]) - mean
        total += d * d
    return total


@_jit
def _layernorm_row(row, gamma, beta, eps, out):
    n = row.shape[0]
    mean = _sum16(row, 0.0) / n
    rstd = 1.0 / math.sqrt(_sumsq16(row, mean) / n + eps)
    for k in range(n):
        out[k] = np.float32((row[k] - mean) * rstd * gamma[k] + beta[k])


@_pjit
def _layernorm(x, gamma, beta, eps, P):
    T, D = x.shape
    out = np.empty((T, D), dtype=np.float32)
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            _layernorm_row(x[t], gamma, beta, eps, out[t])
    return out


@_pjit
def _layernorm_quantize(x, gamma, beta, eps, q, s, P):
    T, D = x.shape
    for p in numba.prange(P):
        buf = np.empty(D, dtype=np.float32)
        for t in range(p * T // P, (p + 1) * T // P):
            _layernorm_row(x[t], gamma, beta, eps, buf)
            s[t] = _quantize_row(buf, q[t])
    return q, s


def _check_norm(x, gamma, beta):
    x = _f32_2d(x, "layernorm")
    d = x.shape[1]
    for name, p in (("weight", gamma), ("bias", beta)):
        if p.shape != (d,):
            raise TinyViTError(f"layernorm {name} must have shape ({d},), found {p.shape}")
    return x, np.ascontiguousarray(gamma, np.float32), np.ascontiguousarray(beta, np.float32)


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis of float32 ``(T, D)``; float64 statistics, float32 out."""
    x, gamma, beta = _check_norm(x, gamma, beta)
    return _layernorm(x, gamma, beta, float(eps), _parts(x.shape[0]))


def layernorm_quantize(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, out=None):
    """``quantize_rows(layernorm(x, ...))`` in one pass: int8 codes and float32 scales
    (into ``out``, a (codes, scales) pair, when given)."""
    x, gamma, beta = _check_norm(x, gamma, beta)
    return _layernorm_quantize(x, gamma, beta, float(eps), *_codes_out(x.shape, out), _parts(x.shape[0]))


_ERF_P = (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02,
)  # fmt: skip
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


@_jit
def _erf(x):
    """erf of a float32 as a rational function on [-4, 4] (Eigen's float erf), in float32.

    Measured against math.erf: |error| <= 4.2e-7 (6.5e-8 if evaluated in float64, at half
    the speed). GELU's output is quantized to int8 straight away (a step of |max| / 127),
    so this moves a code only at a rounding tie; the engine-vs-oracle test replays ties.
    With no libm call the loop vectorizes: 16 lanes a division (math.erf: 18% of a run).
    """
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(_ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + np.float32(c)
    q = np.float32(_ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + np.float32(c)
    return x * p / q


@_jit
def _gelu16(v):
    """GELU of 16 lanes: ``_erf`` and the scalar formula below, operation for operation."""
    x = _fmul(v, _fsplat(_INV_SQRT2_32))
    x = _fmin(_fmax(x, _fsplat(np.float32(-4.0))), _fsplat(np.float32(4.0)))
    x2 = _fmul(x, x)
    p = _fsplat(np.float32(_ERF_P[0]))
    for c in _ERF_P[1:]:
        p = _fadd(_fmul(p, x2), _fsplat(np.float32(c)))
    q = _fsplat(np.float32(_ERF_Q[0]))
    for c in _ERF_Q[1:]:
        q = _fadd(_fmul(q, x2), _fsplat(np.float32(c)))
    erf = _fdiv(_fmul(x, p), q)
    return _fmul(_fmul(_fsplat(np.float32(0.5)), v), _fadd(_fsplat(np.float32(1.0)), erf))


@_jit
def _gelu_row(row, out):
    """GELU of a row into ``out``; returns the largest magnitude written (for the quantizer)."""
    n = row.shape[0]
    n16 = 0 if _PYTHON else n - n % 16
    for k in range(n16, n):
        v = row[k]
        out[k] = np.float32(0.5) * v * (np.float32(1.0) + _erf(v * _INV_SQRT2_32))
    if _PYTHON:
        return np.float32(np.abs(out).max(initial=0.0))
    mv = _fzero()
    for k in range(0, n16, 16):
        g = _gelu16(_fload(row, k))
        _fstore(out, k, g)
        mv = _fmax(mv, _fabs(g))
    m = _fhmax(mv)
    for k in range(n16, n):
        m = max(m, abs(out[k]))
    return m


@_pjit
def _gelu(x, P):
    T, K = x.shape
    out = np.empty((T, K), dtype=np.float32)
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            _gelu_row(x[t], out[t])
    return out


@_pjit
def _gelu_quantize(x, q, s, P):
    T, K = x.shape
    for p in numba.prange(P):
        buf = np.empty(K, dtype=np.float32)
        for t in range(p * T // P, (p + 1) * T // P):
            s[t] = _quantize_with(buf, q[t], _gelu_row(x[t], buf))
    return q, s


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, erf form (torch ``nn.GELU()`` default), float32 ``(T, K)``."""
    x = _f32_2d(x, "gelu")
    return _gelu(x, _parts(x.shape[0]))


def gelu_quantize(x: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None):
    """``quantize_rows(gelu(x))`` in one pass: int8 codes and float32 scales (into ``out``,
    a (codes, scales) pair, when given)."""
    x = _f32_2d(x, "gelu")
    return _gelu_quantize(x, *_codes_out(x.shape, out), _parts(x.shape[0]))


def _check_qkv(qkv: np.ndarray, heads: int) -> np.ndarray:
    if not isinstance(qkv, np.ndarray) or qkv.dtype != np.float32 or qkv.ndim != 3 or qkv.shape[2] % (3 * heads):
        raise TinyViTError(
            f"attention expects float32 qkv of shape (B, N, 3 * dim) with dim divisible by heads={heads}, "
            f"found {getattr(qkv, 'dtype', type(qkv).__name__)} {getattr(qkv, 'shape', '')}"
        )
    return np.ascontiguousarray(qkv)


def attention_ref(qkv: np.ndarray, heads: int) -> np.ndarray:
    """Multi-head self-attention from fused qkv, float32, timm's layout and scale.

    ``qkv[b, i, :]`` holds q, k, v one after another, each split into heads; returns
    ``(B, N, dim)`` with the heads concatenated, as timm's Attention does before proj.
    """
    qkv = _check_qkv(qkv, heads)
    B, N, C3 = qkv.shape
    hd = C3 // 3 // heads
    q, k, v = qkv.reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(hd**-0.5)  # (B, H, N, N)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(B, N, C3 // 3)  # (B, N, dim)


_POW2_NEG = (2.0 ** -np.arange(128)).astype(np.float32)  # 2**-n for n = 0..127
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 split so that n * _LN2_HI is exact (Cody & Waite)
_LN2_LO = np.float32(1.428606765330187e-06)


@_jit
def _exp_nonpositive(x):
    """exp(x) for x <= 0 in float32 arithmetic LLVM can vectorize (libm's expf is a call).

    x = n ln2 + r with |r| <= ln2 / 2; exp(r) by its Taylor polynomial to degree 7
    (truncation < 3e-9), times 2**n from a table. Measured relative error <= 2.5e-7 (about
    2 float32 ulps) against float64 exp; 3x faster than np.exp in a loop. Below -87 the
    result is clamped to exp(-87) ~ 1.6e-38, negligible beside the row's largest term, 1.
    """
    v = max(x, np.float32(-87.0))
    n = np.floor(v * _LOG2E + np.float32(0.5))
    r = v - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 5040)
    p = p * r + np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _POW2_NEG[int(-n)]


@_jit
def _store_rows(out, o, stride, rows, a0, a1, a2, a3):
    """Store the first ``rows`` of four 16-lane results at ``o``, ``o + stride``, ..."""
    _fstore(out, o, a0)
    if rows > 1:
        _fstore(out, o + stride, a1)
    if rows > 2:
        _fstore(out, o + 2 * stride, a2)
    if rows > 3:
        _fstore(out, o + 3 * stride, a3)


@_jit
def _score(p, o, v, scale_v, N):
    """Store scaled scores of keys ``o % Np ...`` + 15 at ``p[o]`` (keys past N: -inf, no
    weight) and return them, for the running maximum."""
    v = _fmul(v, scale_v)
    Np = p.shape[0] // 4
    valid = N - o % Np
    if valid < 16:
        v = _fmask_from(v, valid)
    _fstore(p, o, v)
    return v


@_jit
def _softmax4(p, Np, m0, m1, m2, m3, inv):
    """exp(score - row max) in place for the 4 score rows of ``p`` (16 keys at a time, the
    4 rows interleaved: each exponential is a chain of ~20 dependent operations, and 4
    independent ones keep the core busy); ``inv[r]`` = 1 / the sum of row r's
    exponentials, which the caller applies to the row's output instead of its
    probabilities (one pass less)."""
    n0, n1, n2, n3 = _fsplat(_fhmax(m0)), _fsplat(_fhmax(m1)), _fsplat(_fhmax(m2)), _fsplat(_fhmax(m3))
    s0 = s1 = s2 = s3 = _fzero()
    for jc in range(0, Np, 16):
        e0 = _fexp_nonpositive(_fsub(_fload(p, jc), n0))
        e1 = _fexp_nonpositive(_fsub(_fload(p, Np + jc), n1))
        e2 = _fexp_nonpositive(_fsub(_fload(p, 2 * Np + jc), n2))
        e3 = _fexp_nonpositive(_fsub(_fload(p, 3 * Np + jc), n3))
        _fstore(p, jc, e0)
        _fstore(p, Np + jc, e1)
        _fstore(p, 2 * Np + jc, e2)
        _fstore(p, 3 * Np + jc, e3)
        s0, s1, s2, s3 = _fadd(s0, e0), _fadd(s1, e1), _fadd(s2, e2), _fadd(s3, e3)
    inv[0] = np.float32(1.0) / _fhsum(s0)
    inv[1] = np.float32(1.0) / _fhsum(s1)
    inv[2] = np.float32(1.0) / _fhsum(s2)
    inv[3] = np.float32(1.0) / _fhsum(s3)


@_pjit
def _attention(qkv, heads, out, P, quantize, q, s):
    """Attention of 4 query rows at a time, in zmm registers (``kernels/simd.py``).

    Each thread takes an equal share of the (image, 4 query rows) units, and runs every
    head of a unit. For each image it starts, it lays the keys out transposed, ``kt[c, j]``
    with the key count padded to 16, so that scores for 4 rows x 32
    keys accumulate in 8 registers over the head dimension (one broadcast of q per row and
    d, two fused multiply-adds) and probabilities x V for 4 rows x 32 channels likewise over
    the keys: no horizontal sums, and 8 independent sums in flight (4 would wait on the
    FMA latency). Each row's 1 / sum of exponentials multiplies its output instead of its
    probabilities (one pass less), and the row max and sum reduce as trees. Softmax runs
    on the score rows in between. With ``quantize`` the output rows stay in a
    4-row buffer and become int8 codes ``q`` and scales ``s`` (``quantize_rows``) as soon as
    the unit's last head is done; else they go to ``out``. Needs a head dimension that is
    a multiple of 16 (the wrappers check).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    hd = C // heads
    Np = (N + 15) // 16 * 16
    N16 = N - N % 16
    scale = np.float32(hd**-0.5)
    flat = qkv.reshape(-1)
    quads = (N + 3) // 4
    U = B * quads  # work units: 4 query rows of one image, every head
    for part in numba.prange(P):  # equal numbers of units; consecutive ones share an image
        kt = np.zeros(C * Np, dtype=np.float32)  # padded keys score 0, then -inf (``_score``)
        p = np.empty(4 * Np, dtype=np.float32)
        inv = np.empty(4, dtype=np.float32)  # 1 / sum of each row's exponentials
        ob = np.empty(4 * C if quantize else 0, dtype=np.float32)  # the unit's output rows
        scale_v = _fsplat(scale)
        b = -1
        for u in range(part * U // P, (part + 1) * U // P):
            if u // quads != b:  # a new image: lay its keys out transposed, kt[c, j]
                b = u // quads
                for j0 in range(0, N16, 16):  # 16 x 16 blocks in registers
                    for c0 in range(0, C, 16):
                        _ftranspose16(flat, (b * N + j0) * C3 + C + c0, C3, kt, c0 * Np + j0, Np)
                for j in range(N16, N):
                    base = (b * N + j) * C3 + C
                    for c in range(C):
                        kt[c * Np + j] = flat[base + c]
            i0 = (u % quads) * 4
            rows = min(4, N - i0)
            dst, obase = (ob, 0) if quantize else (out, (b * N + i0) * C)
            for h in range(heads):
                q0 = (b * N + i0) * C3 + h * hd  # rows past the block repeat the last one
                q1 = (b * N + i0 + min(1, rows - 1)) * C3 + h * hd
                q2 = (b * N + i0 + min(2, rows - 1)) * C3 + h * hd
                q3 = (b * N + i0 + min(3, rows - 1)) * C3 + h * hd
                jc = 0
                m0 = m1 = m2 = m3 = _fsplat(np.float32(-np.inf))  # running row maxima
                while jc + 32 <= Np:  # 4 rows x 32 keys: 8 independent sums hide the FMA latency
                    a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = _fzero()
                    for d in range(hd):
                        kv = _fload(kt, (h * hd + d) * Np + jc)
                        kw = _fload(kt, (h * hd + d) * Np + jc + 16)
                        s0, s1, s2, s3 = (
                            _fbcast(flat, q0 + d),
                            _fbcast(flat, q1 + d),
                            _fbcast(flat, q2 + d),
                            _fbcast(flat, q3 + d),
                        )
                        a0, c0 = _ffma(s0, kv, a0), _ffma(s0, kw, c0)
                        a1, c1 = _ffma(s1, kv, a1), _ffma(s1, kw, c1)
                        a2, c2 = _ffma(s2, kv, a2), _ffma(s2, kw, c2)
                        a3, c3 = _ffma(s3, kv, a3), _ffma(s3, kw, c3)
                    m0 = _fmax(m0, _fmax(_score(p, jc, a0, scale_v, N), _score(p, jc + 16, c0, scale_v, N)))
                    m1 = _fmax(m1, _fmax(_score(p, Np + jc, a1, scale_v, N), _score(p, Np + jc + 16, c1, scale_v, N)))
                    m2 = _fmax(
                        m2, _fmax(_score(p, 2 * Np + jc, a2, scale_v, N), _score(p, 2 * Np + jc + 16, c2, scale_v, N))
                    )
                    m3 = _fmax(
                        m3, _fmax(_score(p, 3 * Np + jc, a3, scale_v, N), _score(p, 3 * Np + jc + 16, c3, scale_v, N))
                    )
                    jc += 32
                if jc < Np:  # the last 16 keys
                    a0 = a1 = a2 = a3 = _fzero()
                    for d in range(hd):
                        kv = _fload(kt, (h * hd + d) * Np + jc)
                        a0 = _ffma(_fbcast(flat, q0 + d), kv, a0)
                        a1 = _ffma(_fbcast(flat, q1 + d), kv, a1)
                        a2 = _ffma(_fbcast(flat, q2 + d), kv, a2)
                        a3 = _ffma(_fbcast(flat, q3 + d), kv, a3)
                    m0 = _fmax(m0, _score(p, jc, a0, scale_v, N))
                    m1 = _fmax(m1, _score(p, Np + jc, a1, scale_v, N))
                    m2 = _fmax(m2, _score(p, 2 * Np + jc, a2, scale_v, N))
                    m3 = _fmax(m3, _score(p, 3 * Np + jc, a3, scale_v, N))
                _softmax4(p, Np, m0, m1, m2, m3, inv)  # exponentials in place, 1 / their sums
                i0v, i1v, i2v, i3v = _fsplat(inv[0]), _fsplat(inv[1]), _fsplat(inv[2]), _fsplat(inv[3])
                dc = 0
                while dc + 32 <= hd:  # 4 rows x 32 channels: 8 independent sums
                    a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = _fzero()
                    for j in range(N):
                        vb = (b * N + j) * C3 + 2 * C + h * hd + dc
                        vv, vw = _fload(flat, vb), _fload(flat, vb + 16)
                        s0, s1 = _fbcast(p, j), _fbcast(p, Np + j)
                        s2, s3 = _fbcast(p, 2 * Np + j), _fbcast(p, 3 * Np + j)
                        a0, c0 = _ffma(s0, vv, a0), _ffma(s0, vw, c0)
                        a1, c1 = _ffma(s1, vv, a1), _ffma(s1, vw, c1)
                        a2, c2 = _ffma(s2, vv, a2), _ffma(s2, vw, c2)
                        a3, c3 = _ffma(s3, vv, a3), _ffma(s3, vw, c3)
                    o = obase + h * hd + dc
                    _store_rows(dst, o, C, rows, _fmul(a0, i0v), _fmul(a1, i1v), _fmul(a2, i2v), _fmul(a3, i3v))
                    _store_rows(dst, o + 16, C, rows, _fmul(c0, i0v), _fmul(c1, i1v), _fmul(c2, i2v), _fmul(c3, i3v))
                    dc += 32
                if dc < hd:  # the last 16 channels
                    a0 = a1 = a2 = a3 = _fzero()
                    for j in range(N):
                        vv = _fload(flat, (b * N + j) * C3 + 2 * C + h * hd + dc)
                        a0 = _ffma(_fbcast(p, j), vv, a0)
                        a1 = _ffma(_fbcast(p, Np + j), vv, a1)
                        a2 = _ffma(_fbcast(p, 2 * Np + j), vv, a2)
                        a3 = _ffma(_fbcast(p, 3 * Np + j), vv, a3)
                    o = obase + h * hd + dc
                    _store_rows(dst, o, C, rows, _fmul(a0, i0v), _fmul(a1, i1v), _fmul(a2, i2v), _fmul(a3, i3v))
            if quantize:  # whole rows are done: their int8 codes, from cache
                for r in range(rows):
                    s[b * N + i0 + r] = _quantize_row(ob[r * C : (r + 1) * C], q[b * N + i0 + r])


def attention(qkv: np.ndarray, heads: int, out: np.ndarray | None = None) -> np.ndarray:
    """Fast :func:`attention_ref` (float32, agrees to float32 rounding), into ``out``
    (float32 (B, N, dim)) when given.

    Head dimensions that are not a multiple of 16 (or a disabled JIT) use the reference.
    """
    qkv = _check_qkv(qkv, heads)
    B, N, C3 = qkv.shape
    out = check_out(out, (B, N, C3 // 3), np.float32, "out")
    if (C3 // 3 // heads) % 16 or _PYTHON:
        out[...] = attention_ref(qkv, heads)
    else:
        fn, args = bind_attention(qkv, heads, out=out)
        fn(*args)
    return out


def attention_quantize(qkv: np.ndarray, heads: int, out: tuple[np.ndarray, np.ndarray] | None = None):
    """``quantize_rows(attention(qkv, heads))`` as one kernel, bit-identical: int8 codes
    (B * N, dim) and float32 scales (B * N,), into ``out`` when given. Each unit of work
    finishes its 4 rows for every head, so it quantizes them while they are in cache."""
    qkv = _check_qkv(qkv, heads)
    B, N, C3 = qkv.shape
    q, s = _codes_out((B * N, C3 // 3), out)
    if (C3 // 3 // heads) % 16 or _PYTHON:
        return quantize_rows(attention(qkv, heads).reshape(B * N, -1), (q, s))
    fn, args = bind_attention(qkv, heads, codes=(q, s))
    fn(*args)
    return q, s


def bind_attention(qkv: np.ndarray, heads: int, out: np.ndarray | None = None, codes=None):
    """``(kernel, args)``: the register kernel's call for these (checked) arrays, head
    dimension a multiple of 16: into ``out`` (float32 (B, N, dim)), or straight to int8
    ``codes`` (a (codes, scales) pair) when given. Bound once by a caller that repeats it
    (the engine's plan)."""
    B, N = qkv.shape[:2]
    P = _parts(B * ((N + 3) // 4))
    if codes is None:
        return _attention, (qkv, int(heads), out.reshape(-1), P, False, _NO_CODES, _NO_SCALES)
    return _attention, (qkv, int(heads), _NO_SCALES, P, True, *codes)


_NO_CODES = np.empty((0, 0), dtype=np.int8)
_NO_SCALES = np.empty(0, dtype=np.float32)


@_pjit
def _float_linear(x, w_t, b):
    T, K = x.shape
    N = w_t.shape[1]
    out = np.empty((T, N), dtype=np.float32)
    for t in numba.prange(T):
        acc = b.copy()
        for k in range(K):
            xv = x[t, k]
            for n in range(N):
                acc[n] += xv * w_t[k, n]
        out[t] = acc
    return out


def float_linear(x: np.ndarray, w_t: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x @ w_t + b`` in float32 for the float layers (head, optional patch embedding).

    A Numba loop rather than BLAS: these layers are small, and OpenBLAS's threads keep
    spinning for a while after each call, stealing both cores from the Numba kernels that
    follow (measured: int8 kernels slowed 10-100x right after an sgemm).
    """
    x = _f32_2d(x, "float_linear")
    if w_t.shape[0] != x.shape[1] or b.shape != (w_t.shape[1],):
        raise TinyViTError(f"float_linear: x {x.shape}, weight {w_t.shape}, bias {b.shape} do not fit")
    return _float_linear(x, np.ascontiguousarray(w_t, np.float32), np.ascontiguousarray(b, np.float32))
