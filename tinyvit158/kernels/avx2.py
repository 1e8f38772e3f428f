"""int8 x ternary with AVX2: ``vpmaddubsw`` and ``vpmaddwd``, on any x86 CPU of the last decade.

The identity is the VNNI path's (``kernels/vnni.py``), and so is the weight layout
(``vnni.VNNIWeights``: unsigned codes u = w + 1 in {0, 1, 2}, blocks of 48 channels x 4
input channels, 1 byte or 2 bits a weight):

    sum_k w[n, k] * x[t, k]  =  sum_k u[n, k] * x[t, k]  -  sum_k x[t, k]

Without VNNI the four-byte dot product takes two instructions. ``vpmaddubsw(u, x)`` makes
16 int16 lanes, each ``u[2i] x[2i] + u[2i + 1] x[2i + 1]``, and saturates that pair sum to
int16. It never saturates here: ``|pair| <= 2 * 2 * 128 = 512``. Pair sums are added in
int16 for at most ``CHUNK = 63`` groups of 4 inputs, ``|sum| <= 63 * 512 = 32,256 < 2**15``
for any int8 input (-128 included), and then ``vpmaddwd`` with ones widens them into the
int32 accumulators: 2 instructions per 32 multiply-adds where the float32 tile of
``portable.py`` needs 4. This is the bound BitNet's issue #629 lacked, tested at its edge
(all inputs -128 and 127, every weight +1, K = 4 CHUNK and past it).

Micro-kernel: 4 tokens x 24 channels (half a 48-channel block), 12 int16 accumulators in
ymm registers, 3 weight loads and 4 broadcasts per group. Work is dealt out as the VNNI
path does: equal shares of (row tile, half block) units, one job per thread.
"""

from __future__ import annotations

import numba
import numpy as np

from tinyvit158.kernels.intops import finish_int_row, int_row_buffers
from tinyvit158.kernels.jit import pjit
from tinyvit158.kernels.rowops import gelu_row, quantize_with
from tinyvit158.kernels.simd import ybroadcast4, ydequant_store, yload, ymaddubs16, ystore, ysubstore, ywiden, yzero
from tinyvit158.kernels.vnni import NC, all_weights, block_weights

MR = 4  # tokens per tile
HALF = NC // 2  # channels per tile: 3 ymm of 8
CHUNK = 63  # groups of 4 inputs summed in int16 before widening: 63 * 512 < 2**15


@numba.njit(cache=True, inline="always")
def _tile(x, wl, G, K, t0, T, nb, h):
    """Sums of one 4 x 24 tile (12 int32 ymm, row-major), channels ``24 h`` .. of block
    ``nb``; ``wl`` in the 1-byte layout, ``x`` flat (T, K) int8, K % 4 == 0. Rows past the
    last (T - 1) repeat it: their sums are computed and never stored."""
    x0 = min(t0 + 0, T - 1) * K
    x1 = min(t0 + 1, T - 1) * K
    x2 = min(t0 + 2, T - 1) * K
    x3 = min(t0 + 3, T - 1) * K
    c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = yzero()
    for g0 in range(0, G, CHUNK):
        a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = a30 = a31 = a32 = yzero()
        for g in range(g0, min(g0 + CHUNK, G)):
            wo = (nb * G + g) * 192 + h * 96  # 4 code bytes per output channel
            w0, w1, w2 = yload(wl, wo), yload(wl, wo + 32), yload(wl, wo + 64)
            b = ybroadcast4(x, x0 + 4 * g)
            a00, a01, a02 = ymaddubs16(a00, w0, b), ymaddubs16(a01, w1, b), ymaddubs16(a02, w2, b)
            b = ybroadcast4(x, x1 + 4 * g)
            a10, a11, a12 = ymaddubs16(a10, w0, b), ymaddubs16(a11, w1, b), ymaddubs16(a12, w2, b)
            b = ybroadcast4(x, x2 + 4 * g)
            a20, a21, a22 = ymaddubs16(a20, w0, b), ymaddubs16(a21, w1, b), ymaddubs16(a22, w2, b)
            b = ybroadcast4(x, x3 + 4 * g)
            a30, a31, a32 = ymaddubs16(a30, w0, b), ymaddubs16(a31, w1, b), ymaddubs16(a32, w2, b)
        c00, c01, c02 = ywiden(c00, a00), ywiden(c01, a01), ywiden(c02, a02)
        c10, c11, c12 = ywiden(c10, a10), ywiden(c11, a11), ywiden(c12, a12)
        c20, c21, c22 = ywiden(c20, a20), ywiden(c21, a21), ywiden(c22, a22)
        c30, c31, c32 = ywiden(c30, a30), ywiden(c31, a31), ywiden(c32, a32)
    return c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32


@numba.njit(cache=True)
def _rowsums(x, K, t0, t1, sums):
    """``sums[t - t0] = sum_k x[t, k]`` for rows t0 <= t < t1 of flat int8 (T, K)."""
    for t in range(t0, t1):
        s = np.int32(0)
        for k in range(K):
            s += np.int32(x[t * K + k])
        sums[t - t0] = s


RT = 16  # row tiles of a row group: 64 rows, whose activations stay in cache across channel blocks


@numba.njit(cache=True)
def _unit(u, RB, NH, rt):
    """Work unit ``u`` -> (half block, row group, first row of its tile), as ``vnni._unit``:
    a thread's consecutive units share a half block's weights and a group's activations."""
    g = u // (rt * NH)
    tg = min(rt, RB - g * rt)  # the last group may be short
    r = u - g * rt * NH
    return r // tg, g, (g * rt + r % tg) * MR


@numba.njit(parallel=True, cache=True)
def linear_tiles(x, wl, K, T, N, packed, parts, fused, s_x, scale, bias, has_bias, out, accumulate, acc32):
    """Every tile of (T, N), ``parts`` jobs of equal numbers of (row tile, half block)
    units. Dequantized in the stores into ``out`` (flat T * N float32, added to it when
    ``accumulate``) when ``fused`` (N % 48 == 0); else int32 sums into ``acc32`` (T, N)."""
    G = K // 4
    NB = (N + NC - 1) // NC
    RB = (T + MR - 1) // MR
    U = RB * NB * 2
    rt = RB if RB <= 2 * RT else RT  # a few images' rows: each job takes whole half blocks
    flat32 = acc32.reshape(acc32.size)
    for p in numba.prange(parts):
        scratch = np.empty(G * 192 if packed else 0, dtype=np.uint8)
        sums = np.empty(rt * MR, dtype=np.int32)  # the row sums of the current group
        stage = np.empty(MR * HALF, dtype=np.int32)
        w, wnb, have_nb, have_g = wl, 0, -1, -1
        for u in range(p * U // parts, (p + 1) * U // parts):
            hb, g, t0 = _unit(u, RB, 2 * NB, rt)
            nb, h = hb // 2, hb % 2
            if g != have_g:
                _rowsums(x, K, g * rt * MR, min((g + 1) * rt * MR, T), sums)
                have_g = g
            if nb != have_nb:
                w, wnb = block_weights(wl, nb, G, packed, scratch)
                have_nb = nb
            tile = _tile(x, w, G, K, t0, T, wnb, h)
            whole = nb * NC + (h + 1) * HALF <= N  # every lane of the half block is a real column
            for r in range(min(MR, T - t0)):
                t = t0 + r
                xs = sums[t - g * rt * MR]
                if whole and not fused:  # sum u x - sum x = sum w x, 8 lanes a store
                    for v in range(3):
                        ysubstore(flat32, t * N + nb * NC + h * HALF + 8 * v, tile[r * 3 + v], xs)
                    continue
                for v in range(3):
                    n = nb * NC + h * HALF + 8 * v
                    if fused:
                        ydequant_store(out, t * N + n, tile[r * 3 + v], xs, s_x[t], scale, n, bias, has_bias,
                                       accumulate)  # fmt: skip
                    else:
                        ystore(stage, r * HALF + 8 * v, tile[r * 3 + v])
                if not fused:
                    n0 = nb * NC + h * HALF
                    for n in range(n0, min(n0 + HALF, N)):
                        acc32[t, n] = stage[r * HALF + n - n0] - xs  # sum u x - sum x = sum w x


@pjit
def linear_rows(x, wl, K, T, N, packed, parts, s_x, scale, bias, has_bias, q, s):
    """fc1, GELU and fc2's codes in one pass, as ``vnni.linear_rows`` (bound by ``vnni.bind_rows``): 64 rows at a time,
    every output channel dequantized into a job buffer (in L2), then each row's GELU and
    int8 codes into ``q`` and ``s``. Needs N % 48 == 0."""
    G = K // 4
    NB = N // NC
    RB = (T + MR - 1) // MR
    RG = RT * MR
    for p in numba.prange(parts):
        w = all_weights(wl, NB, G, packed)  # every block, spread to bytes once a job
        sums = np.empty(RG, dtype=np.int32)
        buf = np.empty(RG * N, dtype=np.float32)
        b0, b1 = p * RB // parts, (p + 1) * RB // parts
        for c0 in range(b0, b1, RT):
            r0, r1 = c0 * MR, min(min(c0 + RT, b1) * MR, T)
            _rowsums(x, K, r0, r1, sums)
            for hb in range(2 * NB):
                nb, h = hb // 2, hb % 2
                for t0 in range(r0, r1, MR):
                    tile = _tile(x, w, G, K, t0, T, nb, h)
                    for r in range(min(MR, r1 - t0)):
                        t = t0 + r
                        for v in range(3):
                            n = nb * NC + h * HALF + 8 * v
                            ydequant_store(buf, (t - r0) * N + n, tile[r * 3 + v], sums[t - r0], s_x[t], scale, n,
                                           bias, has_bias, False)  # fmt: skip
            for t in range(r0, r1):
                row = buf[(t - r0) * N : (t - r0 + 1) * N]
                s[t] = quantize_with(row, q[t], gelu_row(row, row))


@pjit
def int_rows(x, wl, K, T, N, packed, parts, R, c, g, e, B, Bf, has_bias, out, res, has_res, gelu, qmax, q, Rq,
             norm, Gn, Bn, E, qn, Rn):  # fmt: skip
    """A ternary layer in integer numerics, in one pass (bound by ``linear.bind_int_linear``):
    64 rows at a time, their int32 sums into a job buffer (in L2), then per row
    ``intops.requantize_row`` into ``out`` and (``has_res``) its residual add, then (``norm``)
    the LayerNorm codes of the stream's row into ``qn`` and ``Rn``; or (``gelu``) the
    i-GELU's codes into ``q`` and ``Rq`` with no Q16 row left behind (``intops.finish_int_row``).
    Needs N % 48 == 0; the integers are those of the product, ``intops.requantize``,
    ``gelu_codes`` and ``layernorm_codes``."""
    G = K // 4
    NB = N // NC
    RB = (T + MR - 1) // MR
    RG = RT * MR
    for p in numba.prange(parts):
        w = all_weights(wl, NB, G, packed)  # every block, spread to bytes once a job
        sums, buf, h, f = int_row_buffers(RG, N, gelu or norm)
        b0, b1 = p * RB // parts, (p + 1) * RB // parts
        for c0 in range(b0, b1, RT):
            r0, r1 = c0 * MR, min(min(c0 + RT, b1) * MR, T)
            _rowsums(x, K, r0, r1, sums)
            for hb in range(2 * NB):
                nb, hh = hb // 2, hb % 2
                for t0 in range(r0, r1, MR):
                    tile = _tile(x, w, G, K, t0, T, nb, hh)
                    for r in range(min(MR, r1 - t0)):
                        t = t0 + r
                        for v in range(3):  # sum u x - sum x = sum w x, 8 lanes a store
                            ysubstore(buf, (t - r0) * N + nb * NC + hh * HALF + 8 * v, tile[r * 3 + v], sums[t - r0])
            for t in range(r0, r1):
                finish_int_row(buf[(t - r0) * N : (t - r0 + 1) * N], t, R, c, g, e, B, Bf, has_bias, out, res, has_res,
                               gelu, qmax, q, Rq, norm, Gn, Bn, E, qn, Rn, h, f)  # fmt: skip
