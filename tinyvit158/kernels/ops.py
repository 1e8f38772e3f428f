"""The float steps between the ternary matmuls, each fused with the quantizer it feeds.

Every function returns float32 (or int8 codes plus float32 scales). LayerNorm (statistics
and output) and attention (scores, softmax, p x V) are computed in float64 and rounded
once to float32: a float32 value then differs from the exact one by half an ulp at most,
the same in any float64 implementation (a PyTorch model's inference path, the float64
oracle), so the int8 codes and scales that the next layer takes agree with theirs except
at float64-level ties. With float32 arithmetic in each, the two orders of summation gave
last-bit differences that flipped codes and scales in most images (measured on the
shipped 86% model: 26 of 10,000 test images changed class between engine and PyTorch;
with float64 LayerNorm and attention and the shared GELU below: 0). GELU's erf is a
float32 rational function (``_erf``, |error| <= 4.2e-7), 16 lanes at a time; the PyTorch
model's inference path computes the same operations (``train/model.GELU``), so the two
agree bit for bit. The quantizer is bit-identical to ``quant.quantize_activations`` on
float32 input (same float32 operations in the same order, no fastmath), so
``layernorm_quantize(x) == quantize_activations(layernorm(x))`` exactly.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tinyvit158.constants import ERF_P, ERF_Q
from tinyvit158.errors import TinyViTError
from tinyvit158.kernels.simd import (  # noqa: I001
    _INV_FACT,
    _INV_LN2_64,
    _LN2_HI_64,
    _LN2_LO_64,
    _dadd,
    _dbcast,
    _dbcast32,
    _dexp,
    _dfma,
    _dhmax,
    _dhsum,
    _dload,
    _dload32,
    _dmax,
    _dmul,
    _dsplat,
    _dstore,
    _dstore32,
    _dsub,
    _dzero,
    _fabs,
    _fadd,
    _fdiv,
    _fhmax,
    _fload,
    _fmax,
    _fmin,
    _fmul,
    _fquantize_store,
    _fsplat,
    _fstore,
    _fzero,
)
from tinyvit158.kernels.ternary import check_out
from tinyvit158.quant import ACT_EPS, ACT_QMAX

# error_model="numpy": a float division by zero gives inf instead of raising, which removes
# the check that keeps LLVM from vectorizing every loop holding a division (GELU ran 3.2x
# faster). No fastmath anywhere: every result is the IEEE one, in a documented order.
_jit = numba.njit(cache=True, error_model="numpy")
_pjit = numba.njit(cache=True, error_model="numpy", parallel=True)
_ijit = numba.njit(cache=True, error_model="numpy", inline="always")  # small helpers in hot loops (and qattn's)
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


@_jit
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


@_jit
def _layernorm_row(row, gamma, beta, eps, out):
    """One row's LayerNorm: float64 statistics, then each output ``((x - mean) * rstd) *
    gamma + beta`` in float64 (no fused multiply-add), rounded once to float32. With 8
    float64 lanes in a zmm register when the row length allows, the sums in four chains of
    lanes (another order, within ~1e-16 as before: the same float32 outputs; one chain was
    bound by the adds' latency, 17-20% slower), else one element at a time."""
    n = row.shape[0]
    if _PYTHON or n % 8:
        mean = _sum64(row, 0.0) / n
        rstd = 1.0 / math.sqrt(_sumsq64(row, mean) / n + eps)
        for k in range(n):
            out[k] = np.float32((row[k] - mean) * rstd * gamma[k] + beta[k])
        return
    a0 = a1 = a2 = a3 = _dzero()  # four chains: the adds' latency, not their throughput, bounds one
    n32 = n - n % 32
    for k in range(0, n32, 32):
        a0 = _dadd(a0, _dload32(row, k))
        a1 = _dadd(a1, _dload32(row, k + 8))
        a2 = _dadd(a2, _dload32(row, k + 16))
        a3 = _dadd(a3, _dload32(row, k + 24))
    for k in range(n32, n, 8):
        a0 = _dadd(a0, _dload32(row, k))
    mean = _dhsum(_dadd(_dadd(a0, a1), _dadd(a2, a3))) / n
    mean_v = _dsplat(mean)
    a0 = a1 = a2 = a3 = _dzero()
    for k in range(0, n32, 32):
        d0 = _dsub(_dload32(row, k), mean_v)
        d1 = _dsub(_dload32(row, k + 8), mean_v)
        d2 = _dsub(_dload32(row, k + 16), mean_v)
        d3 = _dsub(_dload32(row, k + 24), mean_v)
        a0 = _dfma(d0, d0, a0)
        a1 = _dfma(d1, d1, a1)
        a2 = _dfma(d2, d2, a2)
        a3 = _dfma(d3, d3, a3)
    for k in range(n32, n, 8):
        d0 = _dsub(_dload32(row, k), mean_v)
        a0 = _dfma(d0, d0, a0)
    rstd_v = _dsplat(1.0 / math.sqrt(_dhsum(_dadd(_dadd(a0, a1), _dadd(a2, a3))) / n + eps))
    for k in range(0, n, 8):
        y = _dmul(_dmul(_dsub(_dload32(row, k), mean_v), rstd_v), _dload32(gamma, k))
        _dstore32(out, k, _dadd(y, _dload32(beta, k)))


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
    fn, args = bind_layernorm_quantize(x, gamma, beta, eps, out)
    return fn(*args)


def bind_layernorm_quantize(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, out=None):
    """``(kernel, args)``: the call :func:`layernorm_quantize` makes for these (checked)
    arrays, bound once for a caller that repeats it (the engine's plan)."""
    x, gamma, beta = _check_norm(x, gamma, beta)
    return _layernorm_quantize, (x, gamma, beta, float(eps), *_codes_out(x.shape, out), _parts(x.shape[0]))


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
    p = np.float32(ERF_P[0])
    for c in ERF_P[1:]:
        p = p * x2 + np.float32(c)
    q = np.float32(ERF_Q[0])
    for c in ERF_Q[1:]:
        q = q * x2 + np.float32(c)
    return x * p / q


@_ijit
def _gelu16(v):
    """GELU of 16 lanes: ``_erf`` and the scalar formula below, operation for operation."""
    x = _fmul(v, _fsplat(_INV_SQRT2_32))
    x = _fmin(_fmax(x, _fsplat(np.float32(-4.0))), _fsplat(np.float32(4.0)))
    x2 = _fmul(x, x)
    p = _fsplat(np.float32(ERF_P[0]))
    for c in ERF_P[1:]:
        p = _fadd(_fmul(p, x2), _fsplat(np.float32(c)))
    q = _fsplat(np.float32(ERF_Q[0]))
    for c in ERF_Q[1:]:
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


@_jit
def _exp64_inplace(x, bits, n):
    """``x[:n] = exp(x[:n])`` for x <= 0, in float64, as loops LLVM vectorizes (libm's exp
    is a call per value: 40% of the attention's time); the scalar statement of
    ``simd._dexp``, which the attention runs (tests check the two give the same bits).
    x = k ln2 + r, |r| <= ln2 / 2; exp(r) by its Taylor polynomial to degree 13 (truncation
    < 5e-18), times 2**k built from its exponent bits in ``bits`` (int64 scratch, at least n
    long). Relative error
    about 2e-16 (tests compare with np.exp); below -708 the result is clamped to about
    3e-308, negligible beside the largest term of a softmax row, 1."""
    for j in range(n):
        v = max(x[j], -708.0)
        k = np.floor(v * _INV_LN2_64 + 0.5)
        r = v - k * _LN2_HI_64 - k * _LN2_LO_64
        p = _INV_FACT[0]
        for c in _INV_FACT[1:]:
            p = p * r + c
        x[j] = p
        bits[j] = (np.int64(k) + 1023) << 52
    pow2 = bits.view(np.float64)
    for j in range(n):
        x[j] *= pow2[j]


@_ijit
def _softmax_numerators(sc, base, n, scale):
    """``sc[base:base + n] = exp((x - max) * scale)`` in place; returns their sum. Eight lanes
    at a time (``_dexp``: the same bits as ``_exp64_inplace``), the last partial group as a
    whole vector: the row's padding up to the next multiple of 8 is overwritten (the
    attention's score rows have it; those values are never read). The maximum is exact in
    any order; the sum adds the lanes, then the tail one by one (the float64 sum's order
    moves it by ~1e-16)."""
    n8 = n - n % 8
    m = sc[base]
    if n8:
        mv = _dload(sc, base)
        for j in range(base + 8, base + n8, 8):
            mv = _dmax(mv, _dload(sc, j))
        m = max(m, _dhmax(mv))
    for j in range(base + n8, base + n):
        m = max(m, sc[j])
    m_v, scale_v, total_v = _dsplat(m), _dsplat(scale), _dzero()
    for j in range(base, base + n8, 8):
        e = _dexp(_dmul(_dsub(_dload(sc, j), m_v), scale_v))
        _dstore(sc, j, e)
        total_v = _dadd(total_v, e)
    if n8 < n:  # the scalar loop for this tail made the whole attention 7-10% slower (65 keys)
        _dstore(sc, base + n8, _dexp(_dmul(_dsub(_dload(sc, base + n8), m_v), scale_v)))
    total = _dhsum(total_v) if n8 else 0.0
    for j in range(base + n8, base + n):
        total += sc[j]
    return total


@_ijit
def _store_scaled(ob, o, C, rows, a0, a1, a2, a3, inv):
    """Rows 0..rows-1 of a unit's output, 8 channels from ``o``: ``a_r * (1 / total_r)`` in
    float64, each rounded once to float32."""
    _dstore32(ob, o, _dmul(a0, _dsplat(inv[0])))
    if rows > 1:
        _dstore32(ob, C + o, _dmul(a1, _dsplat(inv[1])))
    if rows > 2:
        _dstore32(ob, 2 * C + o, _dmul(a2, _dsplat(inv[2])))
    if rows > 3:
        _dstore32(ob, 3 * C + o, _dmul(a3, _dsplat(inv[3])))


@_pjit
def _attention(qkv, heads, out, P, quantize, q, s):
    """Attention in float64, each output rounded once to float32.

    float32 scores, exponentials and sums carry a few ulps of error that depend on their
    order, and the next layer's int8 codes and scale (the row's largest magnitude) follow
    those last bits: an engine and a PyTorch model computing attention in float32 in
    different orders diverge a little in most images (measured on the 86% model: 26 of
    10,000 test images changed class). In float64 both are within ~1e-15 of the exact
    value, so their float32 roundings agree except at a float64-level tie.

    Each thread takes an equal share of the (image, 4 query rows) units and runs every head
    of a unit. For each image it starts, it lays the keys out in float64 transposed,
    ``kt[c, j]`` (key count padded to 16 with zeros), and the values in float64, so that
    scores for 4 rows x 16 keys accumulate in 8 zmm registers (8 float64 lanes each) over
    the head dimension, and probabilities x V for 4 rows x 16 channels likewise over the
    keys. Softmax runs on the score rows in between (``_softmax_numerators``). With ``quantize``
    the unit's rows become int8 codes ``q`` and scales ``s`` (``quantize_rows``) as soon as
    its last head is done; else they go to ``out`` (flat, (B * N * dim,)). Needs a head
    dimension that is a multiple of 16 (the wrappers check).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    hd = C // heads
    Np = (N + 15) // 16 * 16
    scale = 1.0 / math.sqrt(hd)
    flat = qkv.reshape(-1)
    quads = (N + 3) // 4
    U = B * quads
    for part in numba.prange(P):
        kt = np.zeros(C * Np, dtype=np.float64)  # padded keys stay 0 (their scores are not used)
        vv = np.empty(N * C, dtype=np.float64)
        sc = np.empty(4 * Np, dtype=np.float64)
        inv = np.empty(4, dtype=np.float64)
        ob = np.empty(4 * C, dtype=np.float32)
        b = -1
        for u in range(part * U // P, (part + 1) * U // P):
            if u // quads != b:  # a new image: its keys (transposed) and values in float64
                b = u // quads
                for j in range(N):
                    base = (b * N + j) * C3
                    for c in range(C):
                        kt[c * Np + j] = flat[base + C + c]
                        vv[j * C + c] = flat[base + 2 * C + c]
            i0 = (u % quads) * 4
            rows = min(4, N - i0)
            for h in range(heads):
                o = h * hd
                q0 = (b * N + i0) * C3 + o  # rows past the unit repeat its last one
                q1 = (b * N + i0 + min(1, rows - 1)) * C3 + o
                q2 = (b * N + i0 + min(2, rows - 1)) * C3 + o
                q3 = (b * N + i0 + min(3, rows - 1)) * C3 + o
                for jc in range(0, Np, 16):  # scores: 4 rows x 16 keys in 8 registers
                    a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = _dzero()
                    for d in range(hd):
                        kv = _dload(kt, (o + d) * Np + jc)
                        kw = _dload(kt, (o + d) * Np + jc + 8)
                        s0, s1 = _dbcast32(flat, q0 + d), _dbcast32(flat, q1 + d)
                        s2, s3 = _dbcast32(flat, q2 + d), _dbcast32(flat, q3 + d)
                        a0, c0 = _dfma(s0, kv, a0), _dfma(s0, kw, c0)
                        a1, c1 = _dfma(s1, kv, a1), _dfma(s1, kw, c1)
                        a2, c2 = _dfma(s2, kv, a2), _dfma(s2, kw, c2)
                        a3, c3 = _dfma(s3, kv, a3), _dfma(s3, kw, c3)
                    _dstore(sc, jc, a0)
                    _dstore(sc, jc + 8, c0)
                    _dstore(sc, Np + jc, a1)
                    _dstore(sc, Np + jc + 8, c1)
                    _dstore(sc, 2 * Np + jc, a2)
                    _dstore(sc, 2 * Np + jc + 8, c2)
                    _dstore(sc, 3 * Np + jc, a3)
                    _dstore(sc, 3 * Np + jc + 8, c3)
                for r in range(rows):  # softmax numerators in place; 1 / their sums (only the stored rows)
                    inv[r] = 1.0 / _softmax_numerators(sc, r * Np, N, scale)
                for dc in range(0, hd, 16):  # p x V: 4 rows x 16 channels in 8 registers
                    a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = _dzero()
                    for j in range(N):
                        vb = j * C + o + dc
                        vv0, vv1 = _dload(vv, vb), _dload(vv, vb + 8)
                        p0, p1 = _dbcast(sc, j), _dbcast(sc, Np + j)
                        p2, p3 = _dbcast(sc, 2 * Np + j), _dbcast(sc, 3 * Np + j)
                        a0, c0 = _dfma(p0, vv0, a0), _dfma(p0, vv1, c0)
                        a1, c1 = _dfma(p1, vv0, a1), _dfma(p1, vv1, c1)
                        a2, c2 = _dfma(p2, vv0, a2), _dfma(p2, vv1, c2)
                        a3, c3 = _dfma(p3, vv0, a3), _dfma(p3, vv1, c3)
                    _store_scaled(ob, o + dc, C, rows, a0, a1, a2, a3, inv)
                    _store_scaled(ob, o + dc + 8, C, rows, c0, c1, c2, c3, inv)
            for r in range(rows):
                t = b * N + i0 + r
                if quantize:  # whole rows are done: their int8 codes, from cache
                    s[t] = _quantize_row(ob[r * C : (r + 1) * C], q[t])
                else:
                    out[t * C : (t + 1) * C] = ob[r * C : (r + 1) * C]


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


class FloatAttention:
    """The float attention above as an object with ``qattn.Int8Attention``'s interface, so
    the engine calls either kind the same way (the config picks one per block)."""

    def __call__(self, qkv, heads, out=None, record=None):
        return attention(qkv, heads, out)

    def quantize(self, qkv, heads, out=None, record=None):
        return attention_quantize(qkv, heads, out)

    def bind(self, qkv, heads, out=None, codes=None, record=None):
        return bind_attention(qkv, heads, out, codes)

    def bindable(self, head_dim: int) -> bool:
        """The register kernel needs a head dimension that is a multiple of 16."""
        return head_dim % 16 == 0 and not _PYTHON


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
