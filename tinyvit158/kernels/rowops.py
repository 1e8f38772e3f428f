"""The row steps that make a linear layer's input codes: LayerNorm, GELU and the quantizers.

Every function returns float32, or int8 codes plus float32 scales. LayerNorm's statistics
and output are computed in float64 and rounded once to float32, so any float64
implementation (the PyTorch twin's inference path, the float64 oracle) gives the same
codes except at float64-level ties. GELU's erf is a float32 rational function (``_erf``,
|error| <= 4.2e-7), 16 lanes at a time; the PyTorch twin computes the same operations
(``train/model.GELU``). The quantizer is bit-identical to ``quant.quantize_activations``
on float32 input (same float32 operations in the same order, no fastmath), so
``layernorm_quantize(x) == quantize_activations(layernorm(x))`` exactly.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tinyvit158.constants import ERF_P, ERF_Q
from tinyvit158.errors import TinyViTError
from tinyvit158.kernels.jit import PYTHON, check_f32_rows, codes_out, ijit, jit, job_count, pjit
from tinyvit158.kernels.simd import (
    dadd,
    dfma,
    dhsum,
    dload32,
    dmul,
    dsplat,
    dstore32,
    dsub,
    dzero,
    fabs,
    fadd,
    fdiv,
    fhmax,
    fload,
    fmax,
    fmin,
    fmul,
    fquantize_store,
    fsplat,
    fstore,
    fzero,
)
from tinyvit158.quant import ACT_EPS, ACT_QMAX

_EPS32 = np.float32(ACT_EPS)
_QMAX32 = np.float32(ACT_QMAX)
_INV_SQRT2_32 = np.float32(1.0 / math.sqrt(2.0))


@jit
def row_absmax(row):
    """max |row|, 16 lanes at a time in a zmm register (max is exact in any order)."""
    if PYTHON:
        return np.float32(np.abs(row).max(initial=0.0))
    n = row.shape[0]
    n16 = n - n % 16
    mv = fzero()
    for k in range(0, n16, 16):
        mv = fmax(mv, fabs(fload(row, k)))
    m = fhmax(mv)
    for k in range(n16, n):
        a = abs(row[k])
        m = a if a > m else m
    return m


@jit
def quantize_row(row, q):
    """Absmax int8 quantization of one float32 row into ``q``; returns the scale."""
    return quantize_with(row, q, row_absmax(row))


@jit
def quantize_with(row, q, absmax):
    """:func:`quantize_row` given the row's largest magnitude (from the pass that wrote it)."""
    s = max(absmax, _EPS32) / _QMAX32
    n = row.shape[0]
    n16 = 0 if PYTHON else n - n % 16
    if n16:
        s_v, qmax_v = fsplat(s), fsplat(_QMAX32)
        for k in range(0, n16, 16):
            fquantize_store(q, k, fload(row, k), s_v, qmax_v)
    for k in range(n16, n):
        r = np.rint(row[k] / s)
        q[k] = np.int8(min(max(r, -_QMAX32), _QMAX32))
    return s


@pjit
def _quantize_rows(x, q, s, P):
    T, K = x.shape
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            s[t] = quantize_row(x[t], q[t])
    return q, s


def quantize_rows(x: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None):
    """Per-token absmax int8 quantizer, bit-identical to ``quant.quantize_activations``.

    Returns (int8 codes (T, K), float32 scales (T,)), written into ``out`` when given."""
    x = check_f32_rows(x, "quantize_rows")
    return _quantize_rows(x, *codes_out(x.shape, out), job_count(x.shape[0]))


@jit
def _sum64(row, shift):
    """sum(row - shift) accumulated in float64 (4 independent sums): within about 1e-16 of
    the exact sum, so any float64 implementation of LayerNorm rounds to the same float32."""
    n = row.shape[0]
    n4 = n - n % 4
    a0 = a1 = a2 = a3 = 0.0
    for k in range(0, n4, 4):
        a0 += np.float64(row[k]) - shift
        a1 += np.float64(row[k + 1]) - shift
        a2 += np.float64(row[k + 2]) - shift
        a3 += np.float64(row[k + 3]) - shift
    for k in range(n4, n):
        a0 += np.float64(row[k]) - shift
    return (a0 + a1) + (a2 + a3)


@jit
def _sumsq64(row, mean):
    """sum((row - mean)**2) in float64 (mean subtracted first: no cancellation)."""
    n = row.shape[0]
    n4 = n - n % 4
    a0 = a1 = a2 = a3 = 0.0
    for k in range(0, n4, 4):
        d0 = np.float64(row[k]) - mean
        d1 = np.float64(row[k + 1]) - mean
        d2 = np.float64(row[k + 2]) - mean
        d3 = np.float64(row[k + 3]) - mean
        a0 += d0 * d0
        a1 += d1 * d1
        a2 += d2 * d2
        a3 += d3 * d3
    for k in range(n4, n):
        d = np.float64(row[k]) - mean
        a0 += d * d
    return (a0 + a1) + (a2 + a3)


@jit
def layernorm_row(row, gamma, beta, eps, out):
    """One row's LayerNorm: float64 statistics, then each output ``((x - mean) * rstd) *
    gamma + beta`` in float64 (no fused multiply-add), rounded once to float32. With 8
    float64 lanes in a zmm register when the row length allows, the sums in four chains of
    lanes (another order, within ~1e-16 as before: the same float32 outputs; one chain was
    bound by the adds' latency, 17-20% slower), else one element at a time."""
    n = row.shape[0]
    if PYTHON or n % 8:
        mean = _sum64(row, 0.0) / n
        rstd = 1.0 / math.sqrt(_sumsq64(row, mean) / n + eps)
        for k in range(n):
            out[k] = np.float32((row[k] - mean) * rstd * gamma[k] + beta[k])
        return
    a0 = a1 = a2 = a3 = dzero()  # four chains: the adds' latency, not their throughput, bounds one
    n32 = n - n % 32
    for k in range(0, n32, 32):
        a0 = dadd(a0, dload32(row, k))
        a1 = dadd(a1, dload32(row, k + 8))
        a2 = dadd(a2, dload32(row, k + 16))
        a3 = dadd(a3, dload32(row, k + 24))
    for k in range(n32, n, 8):
        a0 = dadd(a0, dload32(row, k))
    mean = dhsum(dadd(dadd(a0, a1), dadd(a2, a3))) / n
    mean_v = dsplat(mean)
    a0 = a1 = a2 = a3 = dzero()
    for k in range(0, n32, 32):
        d0 = dsub(dload32(row, k), mean_v)
        d1 = dsub(dload32(row, k + 8), mean_v)
        d2 = dsub(dload32(row, k + 16), mean_v)
        d3 = dsub(dload32(row, k + 24), mean_v)
        a0 = dfma(d0, d0, a0)
        a1 = dfma(d1, d1, a1)
        a2 = dfma(d2, d2, a2)
        a3 = dfma(d3, d3, a3)
    for k in range(n32, n, 8):
        d0 = dsub(dload32(row, k), mean_v)
        a0 = dfma(d0, d0, a0)
    rstd_v = dsplat(1.0 / math.sqrt(dhsum(dadd(dadd(a0, a1), dadd(a2, a3))) / n + eps))
    for k in range(0, n, 8):
        y = dmul(dmul(dsub(dload32(row, k), mean_v), rstd_v), dload32(gamma, k))
        dstore32(out, k, dadd(y, dload32(beta, k)))


@pjit
def _layernorm(x, gamma, beta, eps, P):
    T, D = x.shape
    out = np.empty((T, D), dtype=np.float32)
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            layernorm_row(x[t], gamma, beta, eps, out[t])
    return out


@pjit
def _layernorm_quantize(x, gamma, beta, eps, q, s, P):
    T, D = x.shape
    for p in numba.prange(P):
        buf = np.empty(D, dtype=np.float32)
        for t in range(p * T // P, (p + 1) * T // P):
            layernorm_row(x[t], gamma, beta, eps, buf)
            s[t] = quantize_row(buf, q[t])
    return q, s


def _check_norm(x, gamma, beta):
    x = check_f32_rows(x, "layernorm")
    d = x.shape[1]
    for name, p in (("weight", gamma), ("bias", beta)):
        if p.shape != (d,):
            raise TinyViTError(f"layernorm {name} must have shape ({d},), found {p.shape}")
    return x, np.ascontiguousarray(gamma, np.float32), np.ascontiguousarray(beta, np.float32)


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis of float32 ``(T, D)``; float64 statistics, float32 out."""
    x, gamma, beta = _check_norm(x, gamma, beta)
    return _layernorm(x, gamma, beta, float(eps), job_count(x.shape[0]))


def layernorm_quantize(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, out=None):
    """``quantize_rows(layernorm(x, ...))`` in one pass: int8 codes and float32 scales
    (into ``out``, a (codes, scales) pair, when given)."""
    fn, args = bind_layernorm_quantize(x, gamma, beta, eps, out)
    return fn(*args)


def bind_layernorm_quantize(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, out=None):
    """``(kernel, args)``: the call :func:`layernorm_quantize` makes for these (checked)
    arrays, bound once for a caller that repeats it (the engine's plan)."""
    x, gamma, beta = _check_norm(x, gamma, beta)
    return _layernorm_quantize, (x, gamma, beta, float(eps), *codes_out(x.shape, out), job_count(x.shape[0]))


@jit
def _erf(x):
    """erf of a float32 as a rational function on [-4, 4] (Eigen's float erf), in float32.

    Measured against math.erf: |error| <= 4.2e-7 (6.5e-8 if evaluated in float64, at half
    the speed). GELU's output is quantized to int8 straight away (a step of |max| / 127),
    so this moves a code only at a rounding tie; the engine-vs-oracle test replays ties.
    With no libm call the loop vectorizes: 16 lanes a division (math.erf: 18% of a run).
    """
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(ERF_P[0])
    for c in ERF_P[1:]:
        p = p * x2 + np.float32(c)
    q = np.float32(ERF_Q[0])
    for c in ERF_Q[1:]:
        q = q * x2 + np.float32(c)
    return x * p / q


@ijit
def _gelu16(v):
    """GELU of 16 lanes: ``_erf`` and the scalar formula below, operation for operation."""
    x = fmul(v, fsplat(_INV_SQRT2_32))
    x = fmin(fmax(x, fsplat(np.float32(-4.0))), fsplat(np.float32(4.0)))
    x2 = fmul(x, x)
    p = fsplat(np.float32(ERF_P[0]))
    for c in ERF_P[1:]:
        p = fadd(fmul(p, x2), fsplat(np.float32(c)))
    q = fsplat(np.float32(ERF_Q[0]))
    for c in ERF_Q[1:]:
        q = fadd(fmul(q, x2), fsplat(np.float32(c)))
    erf = fdiv(fmul(x, p), q)
    return fmul(fmul(fsplat(np.float32(0.5)), v), fadd(fsplat(np.float32(1.0)), erf))


@jit
def gelu_row(row, out):
    """GELU of a row into ``out``; returns the largest magnitude written (for the quantizer)."""
    n = row.shape[0]
    n16 = 0 if PYTHON else n - n % 16
    for k in range(n16, n):
        v = row[k]
        out[k] = np.float32(0.5) * v * (np.float32(1.0) + _erf(v * _INV_SQRT2_32))
    if PYTHON:
        return np.float32(np.abs(out).max(initial=0.0))
    mv = fzero()
    for k in range(0, n16, 16):
        g = _gelu16(fload(row, k))
        fstore(out, k, g)
        mv = fmax(mv, fabs(g))
    m = fhmax(mv)
    for k in range(n16, n):
        m = max(m, abs(out[k]))
    return m


@pjit
def _gelu(x, P):
    T, K = x.shape
    out = np.empty((T, K), dtype=np.float32)
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            gelu_row(x[t], out[t])
    return out


@pjit
def _gelu_quantize(x, q, s, P):
    T, K = x.shape
    for p in numba.prange(P):
        buf = np.empty(K, dtype=np.float32)
        for t in range(p * T // P, (p + 1) * T // P):
            s[t] = quantize_with(buf, q[t], gelu_row(x[t], buf))
    return q, s


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, erf form (torch ``nn.GELU()`` default), float32 ``(T, K)``."""
    x = check_f32_rows(x, "gelu")
    return _gelu(x, job_count(x.shape[0]))


def gelu_quantize(x: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None):
    """``quantize_rows(gelu(x))`` in one pass: int8 codes and float32 scales (into ``out``,
    a (codes, scales) pair, when given)."""
    x = check_f32_rows(x, "gelu")
    return _gelu_quantize(x, *codes_out(x.shape, out), job_count(x.shape[0]))


@pjit
def _bitlinear_quantize(x, first, g1, b1, eps1, g2, b2, eps2, q, s, P):
    T, K = x.shape
    for p in numba.prange(P):
        buf, normed = np.empty(K, dtype=np.float32), np.empty(K, dtype=np.float32)
        for t in range(p * T // P, (p + 1) * T // P):
            row = x[t]
            if first == 1:
                layernorm_row(row, g1, b1, eps1, buf)
                row = buf
            elif first == 2:
                gelu_row(row, buf)
                row = buf
            layernorm_row(row, g2, b2, eps2, normed)
            s[t] = quantize_row(normed, q[t])
    return q, s


def bind_bitlinear_quantize(x: np.ndarray, norm, act: bool, own, out=None):
    """``(kernel, args)`` for a BitLinear layer's input codes in one pass over each row:
    ``quantize_rows(layernorm(first(x), *own))`` with ``first`` the block's LayerNorm
    (``norm``: (weight, bias, eps)), GELU (``act``) or nothing; bit-identical to those
    steps one after another (the same row functions in the same order)."""
    x, g2, b2 = _check_norm(x, *own[:2])
    g1, b1 = (g2, b2) if norm is None else _check_norm(x, *norm[:2])[1:]
    first = 1 if norm is not None else 2 if act else 0
    eps1 = float(norm[2]) if norm is not None else 0.0
    return _bitlinear_quantize, (x, first, g1, b1, eps1, g2, b2, float(own[2]), *codes_out(x.shape, out),
                                 job_count(x.shape[0]))  # fmt: skip
