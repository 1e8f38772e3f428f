"""Integer numerics (``numerics="integer"``): the steps between the int8 x ternary products.

Each kernel computes, row by row, what its NumPy int64 reference in ``tinyvit158/integer.py``
computes over whole arrays (the tests pair them, ``array_equal``): integer addition,
multiplication, comparison and Python's floor division, so any order of work gives the
same integers. Lanes: the codes are int8; sums of code products int32 (each bound stated
where it is summed); Q16 rows int32, as the engine's buffers hold them (|v| <= SAT); every
other value int64, and every bound that keeps an intermediate inside int64 is the
reference's (stated there). Float64 appears as a carrier of exact integers, or as an
estimate used only where its error bound proves it equal to them: in ``_isqrt`` (the
correctly rounded square root as a first guess, corrected to ``floor(sqrt(v))``, as the
reference does), in the codes (an estimate away from every tie; a row holding a near-tie
takes quotients of integers below 2**53, a reciprocal's estimate corrected to the exact
floor), in ``_requantize`` (likewise; the rows it is unsure of are redone in int64), in
i-GELU (every product below 2**48) and in ``_attention_codes`` (every integer below 2**53
by a bound checked per image and head, its quotients corrected as the codes' are; float32
where the code products' sums stay below 2**24).

- :func:`layernorm_codes`: the integer LayerNorm of Q16 rows, straight to int8 codes and
  their Q16 absmax ``R``.
- :func:`requantize` (:func:`bind_requantize`): a product's int32 sums to Q16,
  ``round_div(acc R g, qmax 2**e) + B``, optionally added into the residual stream.
- :func:`codes_rows`, :func:`gelu_codes`: a row's codes (after i-GELU).
- :func:`attention_codes`: the integer attention of one batch, to the proj layer's codes.
- the row functions the step kernels share with the one-pass layer kernels
  (``avx2.int_rows``, ``vnni.int_rows``): :func:`requantize_row`, :func:`add_residual_row`,
  :func:`layernorm_row_codes`, :func:`gelu_row_codes`, and those kernels' row end
  :func:`finish_int_row`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tinyvit158.constants import (
    EXP_A,
    EXP_B,
    EXP_C,
    FRAC,
    GELU_A,
    GELU_B,
    INT_LN2,
    INT_ONE,
    INT_SAT,
    INV_SQRT2,
)
from tinyvit158.kernels.jit import PYTHON, ijit, jit, job_count, pjit
from tinyvit158.kernels.simd import fbcast, ffma, fload, fstore, fzero
from tinyvit158.quant import ACT_QMAX

I64 = np.int64


@jit
def _round_div(a, b):
    """``floor((2a + b) / (2b))`` for ``b > 0`` (Python's floor division, as NumPy's)."""
    return (2 * a + b) // (2 * b)


@jit
def _shift_round(a, k):
    return (a + (I64(1) << (k - 1))) >> k


@jit
def _isqrt(v):
    r = I64(math.floor(math.sqrt(np.float64(v))))
    if r * r > v:
        r -= 1
    if (r + 1) * (r + 1) <= v:
        r += 1
    return r


EXACT = 2**45  # m below: 2 qmax |v| + m and the products checked stay below 2**53, exact in float64
CODE_MARGIN = 2.0**-30  # the codes' estimate errs by under 2**-43: |y| <= qmax + 1/2 < 2**8, four roundings


@ijit
def _floor_div(num, d2, inv):
    """``floor(num / d2)`` of integers held in float64, ``|num| < 2**53``, ``0 < d2 < 2**53``,
    ``inv = fl(1 / d2)``, quotient below 2**50: the estimate is within one of the floor, and
    each correcting product is exact or (past 2**53) still on the right side of ``num``."""
    c = np.floor(num * inv)
    c = c - 1.0 if c * d2 > num else c
    return c + 1.0 if (c + 1.0) * d2 <= num else c


@ijit
def _estimate_codes(v, m, q, qmax):
    """The codes' fast pass: ``y = |v| fl(qmax / m) + 1/2`` estimates ``(2 qmax |v| + m) / (2 m)``
    within 2**-43 (each operand and operation one rounding of relative 2**-53, any m), so
    ``floor(y)`` is the code unless y lies within ``CODE_MARGIN`` of an integer (every exact
    tie does): returns whether any element did (then the row needs the exact pass)."""
    sc = np.float64(qmax) / np.float64(m)
    unsure = False
    for k in range(v.shape[0]):
        x = np.float64(v[k])
        y = abs(x) * sc + 0.5
        c = np.floor(y)
        f = y - c  # exact
        unsure |= (f < CODE_MARGIN) | (f > 1.0 - CODE_MARGIN)
        q[k] = np.int32(c if x >= 0 else -c)
    return unsure


@ijit
def _exact_codes(v, m, q, qmax):
    """The codes' exact pass. For ``m < 2**45`` each quotient on the integers held exactly in
    float64 (``_floor_div``; 2x a 64-bit division); int64 divisions above."""
    if m >= EXACT:
        for k in range(v.shape[0]):
            c = (2 * qmax * abs(I64(v[k])) + m) // (2 * m)
            q[k] = c if v[k] >= 0 else -c
        return
    d = np.float64(2 * m)
    inv, qm2, mf = 1.0 / d, np.float64(2 * qmax), np.float64(m)
    for k in range(v.shape[0]):
        x = np.float64(v[k])
        c = _floor_div(qm2 * abs(x) + mf, d, inv)
        q[k] = np.int32(c if x >= 0 else -c)


@jit
def _row_codes(v, q, qmax):
    """Codes of one integer row into ``q`` (int8): ``sign(v) floor((2 qmax |v| + m) / (2 m))``,
    0 where ``m = max |v| = 0``; returns m. The estimate, then (rows it is unsure of) the
    exact pass."""
    m = I64(0)
    for k in range(v.shape[0]):
        a = abs(I64(v[k]))
        m = a if a > m else m
    if m == 0:
        q[:] = 0
    elif _estimate_codes(v, m, q, qmax):
        _exact_codes(v, m, q, qmax)
    return m


@jit
def _row_codes_f64(v, q, qmax):
    """``_row_codes`` of a float64 row holding integers below 2**53 in magnitude."""
    m = 0.0
    for k in range(v.shape[0]):
        m = max(m, abs(v[k]))
    if m == 0.0:
        q[:] = 0
    elif _estimate_codes(v, m, q, qmax):
        _exact_codes(v, I64(m), q, qmax)
    return I64(m)


@ijit
def layernorm_row_codes(z, Gf, Bf, E, qmax, q, d, v):
    """The integer LayerNorm of one Q16 row ``z`` (D,) to its codes ``q``; returns R. Mean and
    variance in int64 (``d`` in int32: ``|d| <= 2**25``; each square from two int32 lanes),
    ``T = G d + B s`` in float64 (each product below 2**48, their sum below 2**49: exact),
    then its codes. ``d`` (int32) and ``v`` (float64): the caller's row buffers."""
    D = z.shape[0]
    total = I64(0)
    for k in range(D):
        total += I64(z[k])
    mu = _round_div(total, I64(D))
    ss = I64(0)
    for k in range(D):
        d[k] = np.int32(z[k] - mu)
        ss += I64(d[k]) * I64(d[k])
    s = _isqrt(_round_div(ss, I64(D)) + E)
    sf = np.float64(s)
    for k in range(D):
        v[k] = Gf[k] * np.float64(d[k]) + Bf[k] * sf
    m = _row_codes_f64(v, q, qmax)
    return min(_round_div(m, s), INT_SAT)


@pjit
def _layernorm_codes(z, Gf, Bf, E, qmax, q, R, P):
    """:func:`layernorm_row_codes` of every row."""
    T, D = z.shape
    for p in numba.prange(P):
        d = np.empty(D, dtype=np.int32)
        v = np.empty(D, dtype=np.float64)
        for t in range(p * T // P, (p + 1) * T // P):
            R[t] = layernorm_row_codes(z[t], Gf, Bf, E, qmax, q[t], d, v)


def bind_layernorm_codes(z: np.ndarray, G: np.ndarray, B: np.ndarray, E: int, qmax: int, out):
    """``(kernel, args)`` whose call is :func:`layernorm_codes` of these arrays (G and B in
    float64, exact below 2**53, and the job count made once)."""
    q, R = out
    Gf, Bf = np.asarray(G, np.float64), np.asarray(B, np.float64)
    return _layernorm_codes, (z, Gf, Bf, I64(E), I64(qmax), q, R, job_count(z.shape[0]))


def layernorm_codes(z: np.ndarray, G: np.ndarray, B: np.ndarray, E: int, qmax: int, out) -> tuple:
    """``integer.layer_norm_codes`` of int64 rows ``z`` (T, D) into ``out`` = (int8 codes
    (T, D), int64 R (T,))."""
    fn, args = bind_layernorm_codes(z, G, B, E, qmax, out)
    fn(*args)
    return out


ESTIMATE_LIMIT = 2.0**30  # |estimate| below: its error is under 2**-21, the margin's half
TIE_MARGIN = 2.0**-20
SAT_F = np.float64(INT_SAT)


@ijit
def requantize_row(acc, r, c, g, e, B, Bf, has_bias, out):
    """:func:`requantize` of one row: int32 sums ``acc`` (N,) of codes whose row stands for
    ``q r / 127`` -> Q16 into the int32 row ``out``, saturated (for the fused kernels too).

    Fast pass, in float64 lanes: ``acc r`` is exact (below 2**53) and ``c = g / (127 * 2**e)``
    is rounded once, so the estimate of ``v = acc r g / (127 * 2**e)`` carries a relative
    error under 2**-52: under 2**-22 for |v| < 2**30, and ``u = v + 1/2`` rounds by at most
    2**-23 more. Unless ``u`` lies within ``TIE_MARGIN`` of an integer, ``floor(u)`` is
    therefore the exact ``round_div``. A row holding any other element (about 1 in 700 of
    768-wide rows) is redone in int64: ``((2 acc r g + b) >> (e + 1)) // 127`` with
    ``b = 127 * 2**e`` (floor division by 2**(e+1), then by 127, is floor division by their
    product)."""
    rf = np.float64(r)
    unsure = False
    for n in range(acc.shape[0]):
        v = np.float64(acc[n]) * rf * c[n]
        u = v + 0.5
        y = np.floor(u)
        f = u - y  # exact
        unsure |= (f < TIE_MARGIN) | (f > 1.0 - TIE_MARGIN) | (abs(v) >= ESTIMATE_LIMIT)
        y = y + Bf[n] if has_bias else y  # exact: two integers below 2**52
        out[n] = np.int32(min(max(y, -SAT_F), SAT_F))  # float64 -> int32 vectorizes, -> int64 not (AVX2)
    if unsure:
        ri = I64(r)
        for n in range(acc.shape[0]):
            num = 2 * (I64(acc[n]) * ri * g[n]) + (ACT_QMAX << e[n])
            y = (num >> (e[n] + 1)) // ACT_QMAX
            if has_bias:
                y += B[n]
            out[n] = min(max(y, -INT_SAT), INT_SAT)


@ijit
def add_residual_row(res, out):
    """The residual stream's row ``res += out``, clamped at +-SAT (``|res + out| <= 2 SAT`` before)."""
    for n in range(res.shape[0]):
        res[n] = min(max(res[n] + out[n], -INT_SAT), INT_SAT)


@jit
def int_row_buffers(RG, N, rows):
    """A one-pass integer layer job's buffers: ``RG`` row sums, their ``RG x N`` int32 sums,
    and (``rows``: a norm or GELU follows) an int32 and a float64 row of ``N``."""
    n = N if rows else 0
    return np.empty(RG, np.int32), np.empty(RG * N, np.int32), np.empty(n, np.int32), np.empty(n, np.float64)


@ijit
def finish_int_row(acc, t, R, c, g, e, B, Bf, has_bias, out, res, has_res, gelu, qmax, q, Rq, norm, Gn, Bn, E, qn,
                   Rn, h, f):  # fmt: skip
    """Row ``t`` of a one-pass integer layer (``avx2.int_rows``, ``vnni.int_rows``) from its
    int32 sums ``acc``: :func:`requantize_row` into ``out[t]``, then (``has_res``) its
    residual add and (``norm``) the stream row's LayerNorm codes into ``qn``, ``Rn``; or
    (``gelu``) the i-GELU's codes into ``q``, ``Rq`` with the Q16 row kept in ``h`` only."""
    if gelu:
        requantize_row(acc, R[t], c, g, e, B, Bf, has_bias, h)
        Rq[t] = gelu_row_codes(h, f, q[t], qmax)
        return
    requantize_row(acc, R[t], c, g, e, B, Bf, has_bias, out[t])
    if has_res:
        add_residual_row(res[t], out[t])
    if norm:
        Rn[t] = layernorm_row_codes(res[t] if has_res else out[t], Gn, Bn, E, qmax, qn[t], h, f)


@pjit
def _requantize(acc, R, c, g, e, B, Bf, has_bias, out, res, has_res, P):
    """:func:`requantize_row` of every row, then (``has_res``) its residual add while in cache."""
    T = acc.shape[0]
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            requantize_row(acc[t], R[t], c, g, e, B, Bf, has_bias, out[t])
            if has_res:
                add_residual_row(res[t], out[t])


def requant_scales(g, e) -> np.ndarray:
    """``c = g / (127 * 2**e)`` per output channel, float64: ``g / 127`` rounded once, then
    the exact power of two (what :func:`requantize`'s bound assumes)."""
    return np.ldexp(np.asarray(g, np.float64) / ACT_QMAX, -np.asarray(e))


def bind_requantize(acc: np.ndarray, R: np.ndarray, g, e, B, out: np.ndarray, residual=None):
    """``(kernel, args)`` whose call is :func:`requantize` of these arrays, for a caller that
    repeats it on buffers it refills (the integer engine's plan): the scales, the bias in
    float64 and the job count made once."""
    has_bias, has_res = B is not None, residual is not None
    B = B if has_bias else g
    res = residual if has_res else out
    c = requant_scales(g, e)
    return _requantize, (acc, R, c, g, e, B, B.astype(np.float64), has_bias, out, res, has_res, job_count(acc.shape[0]))


def requantize(acc: np.ndarray, R: np.ndarray, g, e, B, out: np.ndarray, residual=None) -> np.ndarray:
    """``integer.linear``'s second half: int32 sums ``acc`` (T, N) of codes whose rows stand
    for ``q R / 127`` -> Q16 into ``out`` (T, N), saturated at ``+-SAT``. ``|acc R| < 2**53``
    (``|acc| <= 127 K``, ``R <= SAT``: any K below 2**22). ``residual``: Q16 rows (T, N)
    that ``out`` is then added into, row by row while it is in cache, clamped at ``+-SAT``
    (``integer``'s residual stream)."""
    fn, args = bind_requantize(acc, R, g, e, B, out, residual)
    fn(*args)
    return out


GELU_U = INV_SQRT2 * 2.0**-FRAC  # exact: a 16-bit integer times a power of two
GELU_T = GELU_A * 2.0 ** (-2 * FRAC)


@ijit
def _gelu(h):
    """``integer.gelu`` of one Q16 value (``|h| <= 2**25``) held in float64: every product
    below 2**48 (``|h| * 46341``, ``A t**2``, ``h (2**16 + sign erf)``), so each
    ``shift_round`` is an exact ``floor(x 2**-k + 1/2)``, in vectorizable float64 lanes."""
    u = np.floor(abs(h) * GELU_U + 0.5)
    t = min(u, -GELU_B) + GELU_B
    erf = np.floor(t * t * GELU_T + 0.5) + INT_ONE
    k = INT_ONE + erf if h >= 0 else INT_ONE - erf  # h = 0: 0 either way
    return np.floor(h * k * 2.0 ** -(FRAC + 1) + 0.5)


@ijit
def gelu_row_codes(h, g, q, qmax):
    """The codes of one Q16 row's i-GELU into ``q``, via the float64 row ``g``; returns R."""
    for n in range(h.shape[0]):
        g[n] = _gelu(np.float64(h[n]))
    return _row_codes_f64(g, q, qmax)


@pjit
def _codes_of_rows(v, gelu, qmax, q, R, P):
    """The codes of each row of ``v`` (T, N), or of its i-GELU when ``gelu``."""
    T, N = v.shape
    for p in numba.prange(P):
        g = np.empty(N, dtype=np.float64)
        for t in range(p * T // P, (p + 1) * T // P):
            R[t] = gelu_row_codes(v[t], g, q[t], qmax) if gelu else _row_codes(v[t], q[t], qmax)


def codes_rows(v: np.ndarray, qmax: int, out) -> tuple:
    """``integer.codes`` of int64 rows ``v`` (T, K) into ``out`` = (int8 (T, K), int64 (T,))."""
    _codes_of_rows(v, False, I64(qmax), *out, job_count(v.shape[0]))
    return out


def gelu_codes(h: np.ndarray, qmax: int, out) -> tuple:
    """``integer.codes(integer.gelu(h))`` of integer rows (T, N), ``|h| <= 2**25``, into ``out``."""
    _codes_of_rows(h, True, I64(qmax), *out, job_count(h.shape[0]))
    return out


@jit
def _exp_neg(x):
    z = (-x) // INT_LN2
    if z > 62:
        return I64(0)
    p = x + z * INT_LN2
    poly = _shift_round(EXP_A * (p + EXP_B) * (p + EXP_B), 2 * FRAC) + EXP_C
    return poly >> z


@jit
def _attention_unit_int64(qkv, b, h, N, H, hd, qmax, L, j, inv_sqrt, o):
    """One image and head of the integer attention in int64 lanes (the reference's bounds),
    into its columns of ``o``: the path for units whose values pass the float bounds of
    :func:`_attention_codes`."""
    D = H * hd
    base = b * N
    qc = np.empty((N, hd), dtype=np.int8)
    kc = np.empty((N, hd), dtype=np.int8)
    vc = np.empty((hd, N), dtype=np.int8)
    Rq = np.empty(N, dtype=np.int64)
    Rk = np.empty(N, dtype=np.int64)
    Rv = np.empty(hd, dtype=np.int64)
    row = np.empty(N, dtype=np.int64)
    col = np.empty(N, dtype=np.int32)
    for i in range(N):
        Rq[i] = _row_codes(qkv[base + i, h * hd : (h + 1) * hd], qc[i], qmax)
        Rk[i] = _row_codes(qkv[base + i, D + h * hd : D + (h + 1) * hd], kc[i], qmax)
    for d in range(hd):
        for i in range(N):
            col[i] = qkv[base + i, 2 * D + h * hd + d]
        Rv[d] = _row_codes(col, vc[d], qmax)
    for i in range(N):
        m = I64(-(1 << 62))
        for jj in range(N):
            dot = I64(0)
            for d in range(hd):
                dot += I64(qc[i, d]) * I64(kc[jj, d])
            t = _round_div(dot * _shift_round(Rq[i] * Rk[jj], FRAC), qmax * qmax)
            row[jj] = _shift_round(t * inv_sqrt, FRAC)
            m = max(m, row[jj])
        total = I64(0)
        for jj in range(N):
            row[jj] = _exp_neg(row[jj] - m)
            total += row[jj]
        for jj in range(N):
            row[jj] = min(_round_div(L * row[jj] * (I64(1) << j), total), L)
        for d in range(hd):
            acc = I64(0)
            for jj in range(N):
                acc += row[jj] * I64(vc[d, jj])
            o[base + i, h * hd + d] = _round_div(acc * Rv[d], L * qmax * (I64(1) << j))


F32_EXACT = 2.0**24  # integers below it are exact in float32, and so is each partial sum
F64_EXACT = 2.0**53
Q16_INV = 2.0**-FRAC


@pjit
def _attention_codes(qkv, Bn, N, H, hd, qmax, L, j, inv_sqrt, out_qmax, floats, o, q, R, P):
    """Every image and head (``P`` jobs over image x head): codes of q, k per token and head,
    of v per head and channel; integer scores, i-exp probabilities, P V; the Q16 output
    rows into ``o`` (int32: |o| <= max |v|), then per token the proj layer's codes.

    Each integer is carried exactly in float lanes, which vectorize where int64 ones do not:
    the products of codes in float32 (``floats``: every partial sum of ``q.k`` and ``p.v`` is
    below 2**24 in magnitude, ``qmax**2 hd`` and ``L qmax N``), 4 query rows x 16 keys (or
    channels) in registers; every other step in float64, its divisions by ``_floor_div``.
    A unit whose maxima break a float64 bound checked below (its integers would pass 2**53),
    or every unit when ``floats`` is false, runs ``_attention_unit_int64``."""
    D = H * hd
    Np = (N + 15) // 16 * 16
    U = Bn * H
    quads = (N + 3) // 4
    qq = np.float64(qmax * qmax)
    qq2, inv_qq2 = 2.0 * qq, 1.0 / (2.0 * qq)
    isq = np.float64(inv_sqrt)
    ln2, inv_ln2 = np.float64(INT_LN2), 1.0 / np.float64(INT_LN2)
    ea, eb, ec = np.float64(EXP_A), np.float64(EXP_B), np.float64(EXP_C)
    Lj2, Lf = 2.0 * np.float64(L * (I64(1) << j)), np.float64(L)
    den = np.float64(L * qmax * (I64(1) << j))
    den2, inv_den2 = 2.0 * den, 1.0 / (2.0 * den)
    qm2 = 2.0 * np.float64(qmax)
    for p in numba.prange(P):
        c8 = np.empty(hd, dtype=np.int8)
        qf = np.empty(N * hd, dtype=np.float32)  # q codes, a row per token
        kt = np.zeros(hd * Np, dtype=np.float32)  # k codes, a row per channel (keys padded with 0)
        vf = np.empty(N * hd, dtype=np.float32)  # v codes, a row per token
        Rq, Rk = np.empty(N, dtype=np.float64), np.empty(N, dtype=np.float64)
        mv = np.empty(hd, dtype=np.int64)
        Rv, dv2, iv2 = np.empty(hd, dtype=np.float64), np.empty(hd, dtype=np.float64), np.empty(hd, dtype=np.float64)
        sc = np.empty(4 * Np, dtype=np.float32)
        pc = np.zeros(4 * Np, dtype=np.float32)
        srow, e, pw = np.empty(Np, dtype=np.float64), np.empty(Np, dtype=np.float64), np.empty(Np, dtype=np.float64)
        pwi = pw.view(np.int64)
        ob = np.empty(4 * hd, dtype=np.float32)
        for u in range(p * U // P, (p + 1) * U // P):
            b, h = u // H, u % H
            base = b * N
            if not floats:
                _attention_unit_int64(qkv, b, h, N, H, hd, qmax, L, j, inv_sqrt, o)
                continue
            mq, mk = I64(0), I64(0)
            for i in range(N):
                r = _row_codes(qkv[base + i, h * hd : (h + 1) * hd], c8, qmax)
                mq, Rq[i] = max(mq, r), np.float64(r)
                for d in range(hd):
                    qf[i * hd + d] = c8[d]
                r = _row_codes(qkv[base + i, D + h * hd : D + (h + 1) * hd], c8, qmax)
                mk, Rk[i] = max(mk, r), np.float64(r)
                for d in range(hd):
                    kt[d * Np + i] = c8[d]
            v0 = 2 * D + h * hd
            mv[:] = 0
            for i in range(N):
                for d in range(hd):
                    a = abs(I64(qkv[base + i, v0 + d]))
                    mv[d] = a if a > mv[d] else mv[d]
            # the float64 bounds (R < 2**31: R_q R_k < 2**62 in int64): R_q R_k, |2 acc R_qk + qmax**2|,
            # |t inv_sqrt| and |2 (p.v) R_v + den| below 2**53 (sums of float bounds, 2**-30 of margin)
            rqk = (mq * mk + (1 << (FRAC - 1))) >> FRAC
            top = max(
                np.float64(mq) * np.float64(mk),
                2.0 * qq * hd * np.float64(rqk) + qq,
                (hd * np.float64(rqk) + 1.0) * isq,
                2.0 * Lf * qmax * N * np.float64(mv.max()) + den,
            )
            if top >= F64_EXACT * (1.0 - 2.0**-30):
                _attention_unit_int64(qkv, b, h, N, H, hd, qmax, L, j, inv_sqrt, o)
                continue
            for d in range(hd):  # v's codes per channel, all channels in one pass over the tokens
                Rv[d] = np.float64(mv[d])
                dv2[d] = 2.0 * Rv[d] if mv[d] else 1.0
                iv2[d] = 1.0 / dv2[d]
            for i in range(N):
                for d in range(hd):
                    x = np.float64(qkv[base + i, v0 + d])
                    c = _floor_div(qm2 * abs(x) + Rv[d], dv2[d], iv2[d])
                    vf[i * hd + d] = np.float32(c if x >= 0 else -c)
            for qd in range(quads):
                i0 = qd * 4
                rows = min(4, N - i0)  # rows past the unit repeat its last one
                r0, r1 = i0 * hd, (i0 + min(1, rows - 1)) * hd
                r2, r3 = (i0 + min(2, rows - 1)) * hd, (i0 + min(3, rows - 1)) * hd
                for jc in range(0, Np, 16):  # q.k: 4 rows x 16 keys
                    a0 = a1 = a2 = a3 = fzero()
                    for d in range(hd):
                        kv = fload(kt, d * Np + jc)
                        a0 = ffma(fbcast(qf, r0 + d), kv, a0)
                        a1 = ffma(fbcast(qf, r1 + d), kv, a1)
                        a2 = ffma(fbcast(qf, r2 + d), kv, a2)
                        a3 = ffma(fbcast(qf, r3 + d), kv, a3)
                    fstore(sc, jc, a0)
                    fstore(sc, Np + jc, a1)
                    fstore(sc, 2 * Np + jc, a2)
                    fstore(sc, 3 * Np + jc, a3)
                for r in range(rows):
                    rq = Rq[i0 + r] * Q16_INV
                    for jj in range(N):  # s = shift_round(round_div(acc R_qk, qmax**2) inv_sqrt, 16)
                        rqk = np.floor(rq * Rk[jj] + 0.5)
                        t = _floor_div(2.0 * (np.float64(sc[r * Np + jj]) * rqk) + qq, qq2, inv_qq2)
                        srow[jj] = np.floor(t * isq * Q16_INV + 0.5)
                    m = srow[0]
                    for jj in range(1, N):
                        m = max(m, srow[jj])
                    for jj in range(N):  # i-exp of s - m: poly(p) >> z, 2**-z from its exponent bits
                        xn = m - srow[jj]
                        z = min(_floor_div(xn, ln2, inv_ln2), 63.0)  # z > 62: 2**-63 poly < 1
                        w = z * ln2 - xn + eb
                        e[jj] = np.floor(ea * w * w * Q16_INV * Q16_INV + 0.5) + ec
                        pw[jj] = (1023.0 - z) + 2.0**52  # 1023 - z in the low mantissa bits
                    for jj in range(N):
                        pwi[jj] = pwi[jj] << 52
                    total = 0.0
                    for jj in range(N):
                        e[jj] = np.floor(e[jj] * pw[jj])
                        total += e[jj]
                    t2 = 2.0 * total
                    it2 = 1.0 / t2
                    for jj in range(N):
                        pc[r * Np + jj] = np.float32(min(_floor_div(Lj2 * e[jj] + total, t2, it2), Lf))
                for dc in range(0, hd, 16):  # p.v: 4 rows x 16 channels
                    a0 = a1 = a2 = a3 = fzero()
                    for jj in range(N):
                        vv = fload(vf, jj * hd + dc)
                        a0 = ffma(fbcast(pc, jj), vv, a0)
                        a1 = ffma(fbcast(pc, Np + jj), vv, a1)
                        a2 = ffma(fbcast(pc, 2 * Np + jj), vv, a2)
                        a3 = ffma(fbcast(pc, 3 * Np + jj), vv, a3)
                    fstore(ob, dc, a0)
                    fstore(ob, hd + dc, a1)
                    fstore(ob, 2 * hd + dc, a2)
                    fstore(ob, 3 * hd + dc, a3)
                for r in range(rows):
                    t = base + i0 + r
                    for d in range(hd):
                        c = _floor_div(2.0 * (np.float64(ob[r * hd + d]) * Rv[d]) + den, den2, inv_den2)
                        o[t, h * hd + d] = np.int32(c)
    T = Bn * N
    for p in numba.prange(P):
        for t in range(p * T // P, (p + 1) * T // P):
            R[t] = _row_codes(o[t], q[t], out_qmax)


def attention_codes(
    qkv: np.ndarray, images: int, heads: int, bits: int, prob_bits: int, clip: float, out, work=None
) -> tuple:
    """The integer attention (``integer.IntegerOracle.attention`` from its qkv to the proj
    layer's codes) of Q16 ``qkv`` (B * N, 3 D) into ``out`` = (int8 (B * N, D), int64
    (B * N,)); ``work``: an int32 (B * N, D) buffer for the Q16 output (else one is made).
    Float lanes carry the integers for int32 ``qkv`` (the engine's rows) with a head
    dimension a multiple of 16; other inputs run in int64 lanes throughout."""
    q, R = out
    work = np.empty(q.shape, np.int32) if work is None else work
    T, D3 = qkv.shape
    N, hd = T // images, D3 // 3 // heads
    qmax = (1 << (bits - 1)) - 1
    L, j = (1 << prob_bits) - 1, round(-math.log2(clip))
    inv_sqrt = round(INT_ONE / math.sqrt(hd))
    floats = (
        qkv.dtype == np.int32  # R < 2**31: the unit bounds' products stay inside int64
        and hd % 16 == 0
        and not PYTHON  # the vector intrinsics run only compiled
        and max(qmax * qmax * hd, L * qmax * N) < F32_EXACT
    )
    P = job_count(images * heads)
    args = (I64(qmax), I64(L), I64(j), I64(inv_sqrt), I64(ACT_QMAX), floats, work, q, R, P)
    _attention_codes(qkv, images, N, heads, hd, *args)
    return q, R
