"""The float32 steps between the ternary matmuls, each fused with the quantizer it feeds.

Every function returns float32 (or int8 codes plus float32 scales). Row statistics
(LayerNorm mean and variance) and GELU's erf are evaluated in float64 and rounded once to
float32: on 2 cores this costs nothing measurable and halves the engine's distance to
the float64 oracle. The quantizer is bit-identical to ``quant.quantize_activations`` on
float32 input (same float32 operations in the same order, no fastmath), so
``layernorm_quantize(x) == quantize_activations(layernorm(x))`` exactly.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tinyvit158.errors import TinyViTError
from tinyvit158.quant import ACT_EPS, ACT_QMAX

# error_model="numpy": a float division by zero gives inf instead of raising, which removes
# the check that keeps LLVM from vectorizing every loop holding a division (GELU ran 3.2x
# faster). No fastmath anywhere: every result is the IEEE one, in a documented order.
_jit = numba.njit(cache=True, error_model="numpy")
_pjit = numba.njit(cache=True, error_model="numpy", parallel=True)
_EPS32 = np.float32(ACT_EPS)
_QMAX32 = np.float32(ACT_QMAX)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _f32_2d(x: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise TinyViTError(
            f"{what} expects float32 of shape (tokens, features), found "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    return np.ascontiguousarray(x)


@_jit
def _absmax(row):
    """max |row| with 16 running maxima, so the loop vectorizes (max is exact in any order)."""
    n = row.shape[0]
    lanes = np.zeros(16, dtype=np.float32)
    n16 = n - n % 16
    for k in range(0, n16, 16):
        for j in range(16):
            a = abs(row[k + j])
            lanes[j] = a if a > lanes[j] else lanes[j]
    m = np.float32(0.0)
    for j in range(16):
        m = lanes[j] if lanes[j] > m else m
    for k in range(n16, n):
        a = abs(row[k])
        m = a if a > m else m
    return m


@_jit
def _quantize_row(row, q):
    """Absmax int8 quantization of one float32 row into ``q``; returns the scale."""
    s = max(_absmax(row), _EPS32) / _QMAX32
    for k in range(row.shape[0]):
        r = np.rint(row[k] / s)
        q[k] = np.int8(min(max(r, -_QMAX32), _QMAX32))
    return s


@_pjit
def _quantize_rows(x):
    T, K = x.shape
    q = np.empty((T, K), dtype=np.int8)
    s = np.empty(T, dtype=np.float32)
    for t in numba.prange(T):
        s[t] = _quantize_row(x[t], q[t])
    return q, s


def quantize_rows(x: np.ndarray):
    """Per-token absmax int8 quantizer, bit-identical to ``quant.quantize_activations``."""
    return _quantize_rows(_f32_2d(x, "quantize_rows"))


@_jit
def _layernorm_row(row, gamma, beta, eps, out):
    n = row.shape[0]
    mean = 0.0
    for v in row:
        mean += v
    mean /= n
    var = 0.0
    for v in row:
        var += (v - mean) ** 2
    var /= n
    rstd = 1.0 / math.sqrt(var + eps)
    for k in range(n):
        out[k] = np.float32((row[k] - mean) * rstd * gamma[k] + beta[k])


@_pjit
def _layernorm(x, gamma, beta, eps):
    T, D = x.shape
    out = np.empty((T, D), dtype=np.float32)
    for t in numba.prange(T):
        _layernorm_row(x[t], gamma, beta, eps, out[t])
    return out


@_pjit
def _layernorm_quantize(x, gamma, beta, eps):
    T, D = x.shape
    q = np.empty((T, D), dtype=np.int8)
    s = np.empty(T, dtype=np.float32)
    for t in numba.prange(T):
        buf = np.empty(D, dtype=np.float32)
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
    return _layernorm(*_check_norm(x, gamma, beta), float(eps))


def layernorm_quantize(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float):
    """``quantize_rows(layernorm(x, ...))`` in one pass: int8 codes and float32 scales."""
    return _layernorm_quantize(*_check_norm(x, gamma, beta), float(eps))


@_jit
def _erf(x):
    """erf as a rational function on [-4, 4] (Eigen's float erf, evaluated in float64).

    Measured against math.erf: |error| <= 6.5e-8 everywhere, under half a float32 ulp of
    values near 1; with no call to libm it vectorizes (math.erf cost 18% of a batch-1 run).
    """
    x = min(max(x, -4.0), 4.0)
    x2 = x * x
    p = -2.72614225801306e-10
    p = p * x2 + 2.77068142495902e-08
    p = p * x2 - 2.10102402082508e-06
    p = p * x2 - 5.69250639462346e-05
    p = p * x2 - 7.34990630326855e-04
    p = p * x2 - 2.95459980854025e-03
    p = p * x2 - 1.60960333262415e-02
    q = -1.45660718464996e-05
    q = q * x2 - 2.13374055278905e-04
    q = q * x2 - 1.68282697438203e-03
    q = q * x2 - 7.37332916720468e-03
    q = q * x2 - 1.42647390514189e-02
    return x * p / q


@_jit
def _gelu_row(row, out):
    for k in range(row.shape[0]):
        v = np.float64(row[k])
        out[k] = np.float32(0.5 * v * (1.0 + _erf(v * _INV_SQRT2)))


@_pjit
def _gelu(x):
    T, K = x.shape
    out = np.empty((T, K), dtype=np.float32)
    for t in numba.prange(T):
        _gelu_row(x[t], out[t])
    return out


@_pjit
def _gelu_quantize(x):
    T, K = x.shape
    q = np.empty((T, K), dtype=np.int8)
    s = np.empty(T, dtype=np.float32)
    for t in numba.prange(T):
        buf = np.empty(K, dtype=np.float32)
        _gelu_row(x[t], buf)
        s[t] = _quantize_row(buf, q[t])
    return q, s


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, erf form (torch ``nn.GELU()`` default), float32 ``(T, K)``."""
    return _gelu(_f32_2d(x, "gelu"))


def gelu_quantize(x: np.ndarray):
    """``quantize_rows(gelu(x))`` in one pass: int8 codes and float32 scales."""
    return _gelu_quantize(_f32_2d(x, "gelu"))


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


_ROWS_PER_JOB = 16  # query rows per parallel job: even work on 2 cores at batch 1


@_pjit
def _attention(qkv, heads):
    """Jobs over (image, head, block of 16 query rows); inner loops run over contiguous
    keys or channels so LLVM vectorizes them (a dot product over the head dimension would
    be a serial float reduction)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    hd = C // heads
    scale = np.float32(hd**-0.5)
    out = np.empty((B, N, C), dtype=np.float32)
    chunks = (N + _ROWS_PER_JOB - 1) // _ROWS_PER_JOB
    for job in numba.prange(B * heads * chunks):
        b = job // (heads * chunks)
        h = (job // chunks) % heads
        i0 = (job % chunks) * _ROWS_PER_JOB
        kt = np.empty((hd, N), dtype=np.float32)  # this head's keys, transposed
        for j in range(N):
            for d in range(hd):
                kt[d, j] = qkv[b, j, C + h * hd + d]
        s = np.empty(N, dtype=np.float32)
        o = np.empty(hd, dtype=np.float32)
        for i in range(i0, min(i0 + _ROWS_PER_JOB, N)):
            s[:] = 0.0
            for d in range(hd):
                qd = qkv[b, i, h * hd + d]
                for j in range(N):
                    s[j] += qd * kt[d, j]
            m = np.float32(-np.inf)
            for j in range(N):
                s[j] *= scale
                m = max(m, s[j])
            total = np.float32(0.0)
            for j in range(N):
                s[j] = np.exp(s[j] - m)
                total += s[j]
            o[:] = 0.0
            for j in range(N):
                pj = s[j] / total
                for d in range(hd):
                    o[d] += pj * qkv[b, j, 2 * C + h * hd + d]
            out[b, i, h * hd : (h + 1) * hd] = o
    return out


def attention(qkv: np.ndarray, heads: int) -> np.ndarray:
    """Fast :func:`attention_ref` (float32, agrees to float32 rounding)."""
    return _attention(_check_qkv(qkv, heads), int(heads))


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
