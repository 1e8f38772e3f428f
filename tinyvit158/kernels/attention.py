"""The float attention: scores, softmax and P V in float64, each output rounded once to float32.

A float32 value then differs from the exact one by half an ulp at most, the same in any
float64 implementation (the PyTorch twin's inference path, the float64 oracle), so the
int8 codes the proj layer takes agree with theirs except at float64-level ties.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tinyvit158.constants import EXP64_INV_FACT, EXP64_INV_LN2, EXP64_LN2_HI, EXP64_LN2_LO
from tinyvit158.errors import TinyViTError
from tinyvit158.kernels.jit import PYTHON, check_out, codes_out, ijit, jit, job_count, pjit
from tinyvit158.kernels.rowops import quantize_row, quantize_rows
from tinyvit158.kernels.simd import (
    dadd,
    dbcast,
    dbcast32,
    dexp,
    dfma,
    dhmax,
    dhsum,
    dload,
    dmax,
    dmul,
    dsplat,
    dstore,
    dstore32,
    dsub,
    dzero,
)


def check_qkv(qkv: np.ndarray, heads: int) -> np.ndarray:
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
    qkv = check_qkv(qkv, heads)
    B, N, C3 = qkv.shape
    hd = C3 // 3 // heads
    q, k, v = qkv.reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(hd**-0.5)  # (B, H, N, N)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(B, N, C3 // 3)  # (B, N, dim)


@jit
def _exp64_inplace(x, bits, n):
    """``x[:n] = exp(x[:n])`` for x <= 0, in float64, as loops LLVM vectorizes (libm's exp
    is a call per value: 40% of the attention's time); the scalar statement of
    ``simd.dexp``, which the attention runs (tests check the two give the same bits).
    x = k ln2 + r, |r| <= ln2 / 2; exp(r) by its Taylor polynomial to degree 13 (truncation
    < 5e-18), times 2**k built from its exponent bits in ``bits`` (int64 scratch, at least n
    long). Relative error
    about 2e-16 (tests compare with np.exp); below -708 the result is clamped to about
    3e-308, negligible beside the largest term of a softmax row, 1."""
    for j in range(n):
        v = max(x[j], -708.0)
        k = np.floor(v * EXP64_INV_LN2 + 0.5)
        r = v - k * EXP64_LN2_HI - k * EXP64_LN2_LO
        p = EXP64_INV_FACT[0]
        for c in EXP64_INV_FACT[1:]:
            p = p * r + c
        x[j] = p
        bits[j] = (np.int64(k) + 1023) << 52
    pow2 = bits.view(np.float64)
    for j in range(n):
        x[j] *= pow2[j]


@ijit
def _softmax_numerators(sc, base, n, scale):
    """``sc[base:base + n] = exp((x - max) * scale)`` in place; returns their sum. Eight lanes
    at a time (``dexp``: the same bits as ``_exp64_inplace``), the last partial group as a
    whole vector: the row's padding up to the next multiple of 8 is overwritten (the
    attention's score rows have it; those values are never read). The maximum is exact in
    any order; the sum adds the lanes, then the tail one by one (the float64 sum's order
    moves it by ~1e-16)."""
    n8 = n - n % 8
    m = sc[base]
    if n8:
        mv = dload(sc, base)
        for j in range(base + 8, base + n8, 8):
            mv = dmax(mv, dload(sc, j))
        m = max(m, dhmax(mv))
    for j in range(base + n8, base + n):
        m = max(m, sc[j])
    m_v, scale_v, total_v = dsplat(m), dsplat(scale), dzero()
    for j in range(base, base + n8, 8):
        e = dexp(dmul(dsub(dload(sc, j), m_v), scale_v))
        dstore(sc, j, e)
        total_v = dadd(total_v, e)
    if n8 < n:  # the scalar loop for this tail made the whole attention 7-10% slower (65 keys)
        dstore(sc, base + n8, dexp(dmul(dsub(dload(sc, base + n8), m_v), scale_v)))
    total = dhsum(total_v) if n8 else 0.0
    for j in range(base + n8, base + n):
        total += sc[j]
    return total


@ijit
def _store_scaled(ob, o, C, rows, a0, a1, a2, a3, inv):
    """Rows 0..rows-1 of a unit's output, 8 channels from ``o``: ``a_r * (1 / total_r)`` in
    float64, each rounded once to float32."""
    dstore32(ob, o, dmul(a0, dsplat(inv[0])))
    if rows > 1:
        dstore32(ob, C + o, dmul(a1, dsplat(inv[1])))
    if rows > 2:
        dstore32(ob, 2 * C + o, dmul(a2, dsplat(inv[2])))
    if rows > 3:
        dstore32(ob, 3 * C + o, dmul(a3, dsplat(inv[3])))


@pjit
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
                    a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = dzero()
                    for d in range(hd):
                        kv = dload(kt, (o + d) * Np + jc)
                        kw = dload(kt, (o + d) * Np + jc + 8)
                        s0, s1 = dbcast32(flat, q0 + d), dbcast32(flat, q1 + d)
                        s2, s3 = dbcast32(flat, q2 + d), dbcast32(flat, q3 + d)
                        a0, c0 = dfma(s0, kv, a0), dfma(s0, kw, c0)
                        a1, c1 = dfma(s1, kv, a1), dfma(s1, kw, c1)
                        a2, c2 = dfma(s2, kv, a2), dfma(s2, kw, c2)
                        a3, c3 = dfma(s3, kv, a3), dfma(s3, kw, c3)
                    dstore(sc, jc, a0)
                    dstore(sc, jc + 8, c0)
                    dstore(sc, Np + jc, a1)
                    dstore(sc, Np + jc + 8, c1)
                    dstore(sc, 2 * Np + jc, a2)
                    dstore(sc, 2 * Np + jc + 8, c2)
                    dstore(sc, 3 * Np + jc, a3)
                    dstore(sc, 3 * Np + jc + 8, c3)
                for r in range(rows):  # softmax numerators in place; 1 / their sums (only the stored rows)
                    inv[r] = 1.0 / _softmax_numerators(sc, r * Np, N, scale)
                for dc in range(0, hd, 16):  # p x V: 4 rows x 16 channels in 8 registers
                    a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = dzero()
                    for j in range(N):
                        vb = j * C + o + dc
                        vv0, vv1 = dload(vv, vb), dload(vv, vb + 8)
                        p0, p1 = dbcast(sc, j), dbcast(sc, Np + j)
                        p2, p3 = dbcast(sc, 2 * Np + j), dbcast(sc, 3 * Np + j)
                        a0, c0 = dfma(p0, vv0, a0), dfma(p0, vv1, c0)
                        a1, c1 = dfma(p1, vv0, a1), dfma(p1, vv1, c1)
                        a2, c2 = dfma(p2, vv0, a2), dfma(p2, vv1, c2)
                        a3, c3 = dfma(p3, vv0, a3), dfma(p3, vv1, c3)
                    _store_scaled(ob, o + dc, C, rows, a0, a1, a2, a3, inv)
                    _store_scaled(ob, o + dc + 8, C, rows, c0, c1, c2, c3, inv)
            for r in range(rows):
                t = b * N + i0 + r
                if quantize:  # whole rows are done: their int8 codes, from cache
                    s[t] = quantize_row(ob[r * C : (r + 1) * C], q[t])
                else:
                    out[t * C : (t + 1) * C] = ob[r * C : (r + 1) * C]


def attention(qkv: np.ndarray, heads: int, out: np.ndarray | None = None) -> np.ndarray:
    """Fast :func:`attention_ref` (float32, agrees to float32 rounding), into ``out``
    (float32 (B, N, dim)) when given.

    Head dimensions that are not a multiple of 16 (or a disabled JIT) use the reference.
    """
    qkv = check_qkv(qkv, heads)
    B, N, C3 = qkv.shape
    out = check_out(out, (B, N, C3 // 3), np.float32, "out")
    if (C3 // 3 // heads) % 16 or PYTHON:
        out[...] = attention_ref(qkv, heads)
    else:
        fn, args = bind_attention(qkv, heads, out=out)
        fn(*args)
    return out


def attention_quantize(qkv: np.ndarray, heads: int, out: tuple[np.ndarray, np.ndarray] | None = None):
    """``quantize_rows(attention(qkv, heads))`` as one kernel, bit-identical: int8 codes
    (B * N, dim) and float32 scales (B * N,), into ``out`` when given. Each unit of work
    finishes its 4 rows for every head, so it quantizes them while they are in cache."""
    qkv = check_qkv(qkv, heads)
    B, N, C3 = qkv.shape
    q, s = codes_out((B * N, C3 // 3), out)
    if (C3 // 3 // heads) % 16 or PYTHON:
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
    P = job_count(B * ((N + 3) // 4))
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
        """``(kernel, args)``: the register kernel bound to these arrays where it runs (head
        dimension a multiple of 16, JIT on), else the checked function."""
        if (qkv.shape[2] // 3 // heads) % 16 == 0 and not PYTHON:
            return bind_attention(qkv, heads, out, codes)
        return (attention, (qkv, heads, out)) if codes is None else (attention_quantize, (qkv, heads, codes))
