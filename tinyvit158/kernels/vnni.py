"""int8 x ternary with AVX-512 VNNI: ``vpdpbusd`` reached from Numba.

The identity. With weight codes stored as unsigned bytes
``u = w + 1`` in {0, 1, 2}:

    sum_k w[n, k] * x[t, k]  =  sum_k u[n, k] * x[t, k]  -  sum_k x[t, k]

so one ``vpdpbusd`` (unsigned bytes u times signed bytes x, four products summed into each
of 16 int32 lanes: 64 multiply-adds per instruction, exact, non-saturating) does the work,
and one row sum of x per token corrects it. |sum u x| <= 254 K, far below 2**31.

Layout (built once at load, as oneDNN lays out VNNI weights): output channels in blocks of
NC = 48; for each block and each group of 4 input channels, the 48 x 4 bytes are
contiguous, channel-major: ``wl[block, k // 4, c, k % 4]`` (c < 48). K is padded to a
multiple of 4 and N to a multiple of 48 with zero bytes. Activations are read in place:
only when K is not a multiple of 4 are they copied, with zero columns; a last, partial row
tile repeats the last row, whose extra sums are never stored. The row sums of x come from
the same instruction (``vpdpbusd`` with a vector of ones: K / 64 instructions a row).

Work split: the (T / 8) x (N / 48) tiles are dealt out in equal shares, one per thread
(Numba schedules a ``prange`` statically): at batch 1 (65 rows, 9 row tiles) fixed-size
jobs leave one core idle (docs/PERFORMANCE.md).

Micro-kernel: an 8-token x 48-channel tile kept in 24 zmm accumulators. Per group of 4
input channels it loads 3 x 64 weight bytes, broadcasts 4 activation bytes of each row, and
issues 24 ``vpdpbusd``; there is no horizontal reduction. Dequantization and bias are fused
into the tile's vector stores (for widths that are multiples of 48, i.e. every ViT layer;
others take the int32 tile path and dequantize in NumPy, the same float32 operations).
The tile shapes tried against it are in docs/PERFORMANCE.md. ``linear_rows`` is fc1 with
GELU and fc2's codes in one pass over whole output rows, 64 rows at a time, so the MLP's
float32 hidden layer never goes to memory.

The vector types and intrinsics it uses live in ``kernels/simd.py``. They exist only as
compiled code: under ``NUMBA_DISABLE_JIT=1`` the engine uses the generic kernel instead
(see ``kernels.linear.kernel_path``).
"""

from __future__ import annotations

import numba
import numpy as np

from tinyvit158.kernels.intops import finish_int_row, int_row_buffers
from tinyvit158.kernels.jit import pjit
from tinyvit158.kernels.rowops import gelu_row, quantize_with
from tinyvit158.kernels.simd import dequant_store, dpbusd, substore, vbroadcast4, vhsum, vload, vload_u2, vstore, vzero

MR, NV = 8, 3  # tile: 8 tokens x 3 vectors of 16 output channels
NC = 16 * NV  # output channels per block


# The tile below is written out (generated once by a loop over rows and vectors): Numba
# keeps each named accumulator in its own register, which a Python list would not. Inlined
# into its callers, so the 24 results stay in registers (docs/PERFORMANCE.md).
@numba.njit(cache=True, inline="always")
def _tile(x, wl, G, K, t0, T, nb):
    """One 8 x 48 tile: 24 zmm accumulators (returned as a tuple, row-major), 3 weight vectors,
    1 broadcast per row; ``wl`` in the 1-byte layout, ``x`` flat (T, K) int8 with K % 4 == 0.
    Rows past the last (T - 1) repeat it: their sums are computed and never stored."""
    x0 = min(t0 + 0, T - 1) * K
    x1 = min(t0 + 1, T - 1) * K
    x2 = min(t0 + 2, T - 1) * K
    x3 = min(t0 + 3, T - 1) * K
    x4 = min(t0 + 4, T - 1) * K
    x5 = min(t0 + 5, T - 1) * K
    x6 = min(t0 + 6, T - 1) * K
    x7 = min(t0 + 7, T - 1) * K
    a00 = a01 = a02 = vzero()
    a10 = a11 = a12 = vzero()
    a20 = a21 = a22 = vzero()
    a30 = a31 = a32 = vzero()
    a40 = a41 = a42 = vzero()
    a50 = a51 = a52 = vzero()
    a60 = a61 = a62 = vzero()
    a70 = a71 = a72 = vzero()
    for g in range(G):
        wo = (nb * G + g) * 192  # 192 bytes a group: 4 code bytes per output channel
        w0, w1, w2 = vload(wl, wo + 0), vload(wl, wo + 64), vload(wl, wo + 128)
        b = vbroadcast4(x, x0 + 4 * g)
        a00, a01, a02 = dpbusd(a00, w0, b), dpbusd(a01, w1, b), dpbusd(a02, w2, b)
        b = vbroadcast4(x, x1 + 4 * g)
        a10, a11, a12 = dpbusd(a10, w0, b), dpbusd(a11, w1, b), dpbusd(a12, w2, b)
        b = vbroadcast4(x, x2 + 4 * g)
        a20, a21, a22 = dpbusd(a20, w0, b), dpbusd(a21, w1, b), dpbusd(a22, w2, b)
        b = vbroadcast4(x, x3 + 4 * g)
        a30, a31, a32 = dpbusd(a30, w0, b), dpbusd(a31, w1, b), dpbusd(a32, w2, b)
        b = vbroadcast4(x, x4 + 4 * g)
        a40, a41, a42 = dpbusd(a40, w0, b), dpbusd(a41, w1, b), dpbusd(a42, w2, b)
        b = vbroadcast4(x, x5 + 4 * g)
        a50, a51, a52 = dpbusd(a50, w0, b), dpbusd(a51, w1, b), dpbusd(a52, w2, b)
        b = vbroadcast4(x, x6 + 4 * g)
        a60, a61, a62 = dpbusd(a60, w0, b), dpbusd(a61, w1, b), dpbusd(a62, w2, b)
        b = vbroadcast4(x, x7 + 4 * g)
        a70, a71, a72 = dpbusd(a70, w0, b), dpbusd(a71, w1, b), dpbusd(a72, w2, b)
    return (
        a00,
        a01,
        a02,
        a10,
        a11,
        a12,
        a20,
        a21,
        a22,
        a30,
        a31,
        a32,
        a40,
        a41,
        a42,
        a50,
        a51,
        a52,
        a60,
        a61,
        a62,
        a70,
        a71,
        a72,
    )


# A last tile with this many real rows or fewer runs them one at a time (_tile1). The
# callers (linear_tiles, linear_rows) branch on it before calling _tile rather than one
# helper choosing between the two: that helper, returning the 24-tuple either way, made
# batch 64 3-8% slower (the accumulators merged through the branch), so the full-tile
# loop stays as it was.
SHORT = 2


@numba.njit(cache=True, inline="always")
def _tile1(x, wl, G, K, t, nb):
    """Row t alone against block nb: 3 accumulators, the weights read once per row."""
    a0 = a1 = a2 = vzero()
    for g in range(G):
        wo = (nb * G + g) * 192
        b = vbroadcast4(x, t * K + 4 * g)
        a0 = dpbusd(a0, vload(wl, wo + 0), b)
        a1 = dpbusd(a1, vload(wl, wo + 64), b)
        a2 = dpbusd(a2, vload(wl, wo + 128), b)
    return a0, a1, a2


@numba.njit(cache=True, inline="always")
def _store3(out, o, a0, a1, a2, xs, s, scale, n, bias, has_bias, accumulate):
    """A row's 48 outputs of one block from its 3 accumulators, dequantized into ``out`` from
    ``o`` (channels from ``n``; ``simd.dequant_store``, 16 lanes each)."""
    dequant_store(out, o, a0, xs, s, scale, n, bias, has_bias, accumulate)
    dequant_store(out, o + 16, a1, xs, s, scale, n + 16, bias, has_bias, accumulate)
    dequant_store(out, o + 32, a2, xs, s, scale, n + 32, bias, has_bias, accumulate)


class VNNIWeights:
    """Ternary weights re-laid out for the tile: unsigned codes u = w + 1, blocked by 48 channels.

    ``packed=False``: one byte per weight, ``wl[block, k // 4, c, k % 4]``.
    ``packed=True``: 2 bits per weight (a quarter of the bytes): the four codes of channel c
    and input group k // 4 share one byte, ``wl[block, k // 4, c] = sum_j u[c, 4 (k // 4) + j] << 2j``;
    each job spreads its block's codes to bytes once (``simd.vload_u2``), in cache, and
    runs its row tiles on them.
    """

    def __init__(self, codes: np.ndarray, packed: bool = False):
        n, k = codes.shape
        self.n, self.k, self.packed = n, k, packed
        self.kp = -(-k // 4) * 4
        self.np_ = -(-n // NC) * NC
        u = np.zeros((self.np_, self.kp), dtype=np.uint8)
        u[:n, :k] = (codes + 1).astype(np.uint8)  # -1, 0, +1 -> 0, 1, 2
        blocks = u.reshape(self.np_ // NC, NC, self.kp // 4, 4).transpose(0, 2, 1, 3)  # (NB, G, 48, 4)
        if packed:
            blocks = np.bitwise_or.reduce(blocks << np.array([0, 2, 4, 6], dtype=np.uint8), axis=3)  # (NB, G, 48)
        self.wl = np.ascontiguousarray(blocks).reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.wl.nbytes

    def codes(self) -> np.ndarray:
        """The int8 (N, K) ternary codes back from the layout."""
        nb, g = self.np_ // NC, self.kp // 4
        if self.packed:
            u = (self.wl.reshape(nb, g, NC)[..., None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
        else:
            u = self.wl.reshape(nb, g, NC, 4)
        u = u.transpose(0, 2, 1, 3).reshape(self.np_, self.kp)
        return np.ascontiguousarray(u[: self.n, : self.k].astype(np.int8) - 1)


_ONES = np.ones(4, dtype=np.uint8)  # broadcast: 64 bytes of 1, for row sums by vpdpbusd
RT = 8  # row tiles of a row group: 64 rows, whose activations stay in cache across channel blocks


@numba.njit(cache=True)
def _unpack_block(wl, nb, G, dst, dst_nb):
    """Spread block ``nb`` of the 2-bit layout ``wl`` to the 1-byte layout, as block
    ``dst_nb`` of ``dst``."""
    for g in range(G):
        src = (nb * G + g) * 48
        o = (dst_nb * G + g) * 192
        vstore(dst, o, vload_u2(wl, src))
        vstore(dst, o + 64, vload_u2(wl, src + 16))
        vstore(dst, o + 128, vload_u2(wl, src + 32))


@numba.njit(cache=True)
def block_weights(wl, nb, G, packed, scratch):
    """The 1-byte layout of channel block ``nb``, and its block index in that array: the
    array itself when not packed, else ``scratch`` after spreading the 2-bit codes into it
    (once per block a job visits, then reused by its row tiles, from L1/L2)."""
    if not packed:
        return wl, nb
    _unpack_block(wl, nb, G, scratch, 0)
    return scratch, 0


@numba.njit(cache=True)
def all_weights(wl, NB, G, packed):
    """The 1-byte layout of every block: ``wl`` itself, or its 2-bit codes spread into a
    new array (for a job that visits every block: once, then from L2)."""
    if not packed:
        return wl
    out = np.empty(NB * G * 192, dtype=np.uint8)
    for nb in range(NB):
        _unpack_block(wl, nb, G, out, nb)
    return out


@numba.njit(cache=True)
def _rowsums(x, K, t0, t1, sums):
    """``sums[t - t0] = sum_k x[t, k]`` for rows t0 <= t < t1 of flat int8 (T, K): one
    ``vpdpbusd`` with a vector of ones per 64 bytes."""
    ones = vbroadcast4(_ONES, 0)
    for t in range(t0, t1):
        acc = vzero()
        k64 = K - K % 64
        for k in range(0, k64, 64):
            acc = dpbusd(acc, ones, vload(x, t * K + k))
        s = vhsum(acc)
        for k in range(k64, K):
            s += np.int32(x[t * K + k])
        sums[t - t0] = s


@numba.njit(cache=True)
def _unit(u, RB, NB, rt):
    """Work unit ``u`` -> (channel block, row group, first row of its tile). Units run over
    row groups (``rt`` tiles), then channel blocks, then the group's tiles, so a thread's
    consecutive units share a block's weights and a group's activations."""
    g = u // (rt * NB)
    tg = min(rt, RB - g * rt)  # the last group may be short
    r = u - g * rt * NB
    return r // tg, g, (g * rt + r % tg) * MR


@numba.njit(cache=True)
def _group_tiles(RB):
    """Row tiles a group: ``RT``, or all of them when there are at most 2 RT (a few images'
    rows): then each job takes whole channel blocks, so it spreads fewer 2-bit blocks to
    bytes, and every job gets its share of the cheap last rows (``_tile1``)."""
    return RB if RB <= 2 * RT else RT


@numba.njit(parallel=True, cache=True)
def linear_tiles(x, wl, K, T, N, packed, parts, fused, s_x, scale, bias, has_bias, out, accumulate, acc32):
    """Every tile of (T, N): ``parts`` jobs of equal numbers of tiles (one job per thread,
    so at batch 1 both cores get the same work). Dequantization and bias are fused into
    vector stores into ``out`` (flat T * N float32; added to it when ``accumulate``) when
    ``fused`` (needs N % 48 == 0: every ViT width); else the int32 sums go to ``acc32`` (T, N)."""
    G = K // 4
    NB = (N + NC - 1) // NC
    RB = (T + MR - 1) // MR
    U = RB * NB
    rt = _group_tiles(RB)
    for p in numba.prange(parts):
        scratch = np.empty(G * 192 if packed else 0, dtype=np.uint8)
        sums = np.empty(rt * MR, dtype=np.int32)  # the row sums of the current group
        stage = np.empty(MR * NC, dtype=np.int32)  # a tile's int32 sums (unfused stores)
        w, wnb, have_nb, have_g = wl, 0, -1, -1
        for u in range(p * U // parts, (p + 1) * U // parts):
            nb, g, t0 = _unit(u, RB, NB, rt)
            if g != have_g:
                _rowsums(x, K, g * rt * MR, min((g + 1) * rt * MR, T), sums)
                have_g = g
            if nb != have_nb:
                w, wnb = block_weights(wl, nb, G, packed, scratch)
                have_nb = nb
            if T - t0 <= SHORT:  # a last tile of 1 or 2 real rows: one row at a time (_tile1)
                for t in range(t0, T):
                    a0, a1, a2 = _tile1(x, w, G, K, t, wnb)
                    xs, n = sums[t - g * rt * MR], nb * NC
                    if fused:
                        _store3(out, t * N + n, a0, a1, a2, xs, s_x[t], scale, n, bias, has_bias, accumulate)
                    else:
                        vstore(stage, 0, a0)
                        vstore(stage, 16, a1)
                        vstore(stage, 32, a2)
                        for c in range(n, min(n + NC, N)):
                            acc32[t, c] = stage[c - n] - xs
                continue
            tile = _tile(x, w, G, K, t0, T, wnb)
            # the stores below are _store3 (or the short branch's staging) written out: one
            # helper for both, taking the fused flag, measured proj 3-4% and fc2 ~1% slower at
            # batch 64 (paired runs, 4 pairs); fc1's pass (linear_rows) timed equal with it
            for r in range(min(MR, T - t0)):
                t = t0 + r
                xs = sums[t - g * rt * MR]
                for v in range(NV):
                    if fused:
                        n = nb * NC + 16 * v
                        a = tile[r * NV + v]
                        dequant_store(out, t * N + n, a, xs, s_x[t], scale, n, bias, has_bias, accumulate)
                    else:
                        vstore(stage, (r * NV + v) * 16, tile[r * NV + v])
                if not fused:
                    for n in range(nb * NC, min(nb * NC + NC, N)):
                        acc32[t, n] = stage[r * NC + n - nb * NC] - xs  # sum u x - sum x = sum w x


def prepared(x_q: np.ndarray, w: VNNIWeights) -> tuple[np.ndarray, int]:
    """x flat, with zero columns up to a multiple of 4 when needed (then a copy)."""
    if x_q.shape[1] != w.kp:
        xp = np.zeros((x_q.shape[0], w.kp), dtype=np.int8)
        xp[:, : x_q.shape[1]] = x_q
        x_q = xp
    return x_q.reshape(-1), w.kp


NONE_F32 = np.empty(0, dtype=np.float32)  # the arguments a kernel call does not use
NONE_I32 = np.empty((0, 0), dtype=np.int32)


def bind_tiled_matmul(tiles, x_q: np.ndarray, w: VNNIWeights, acc: np.ndarray):
    """``(kernel, args)``: the int32 (T, N) sums of ``tiles`` (this module's ``linear_tiles``
    or a twin with its signature: ``avx2.linear_tiles``) into ``acc``, bound to these arrays;
    inputs checked by the caller (``kernels.linear``). ``x_q`` is read in place when K % 4 == 0."""
    x, K = prepared(x_q, w)
    e = NONE_F32
    return tiles, (x, w.wl, K, x_q.shape[0], w.n, w.packed, numba.get_num_threads(), False, e, e, e, False, e, False,
                   acc)  # fmt: skip


def tiled_matmul(tiles, x_q: np.ndarray, w: VNNIWeights, acc: np.ndarray) -> np.ndarray:
    """:func:`bind_tiled_matmul`, called once."""
    fn, args = bind_tiled_matmul(tiles, x_q, w, acc)
    fn(*args)
    return acc


def bind_tiled(tiles, x_q, s_x, w: VNNIWeights, scale, bias, has_bias, out, accumulate):
    """``(kernel, args)``: the dequantizing call of ``tiles``, bound to these arrays, for a
    caller that repeats it on buffers it refills (the engine's plan): float32 (T, N) into
    ``out`` (C-contiguous), added to it when ``accumulate``, bit-identical to
    ``linear.linear_ref``. Needs N % 48 == 0, and K % 4 == 0 to read ``x_q`` in place (else
    the bound call would hold a padded copy)."""
    x, K = prepared(x_q, w)
    parts, flat = numba.get_num_threads(), out.reshape(-1)
    return tiles, (x, w.wl, K, x_q.shape[0], w.n, w.packed, parts, True, s_x, scale, bias, has_bias, flat, accumulate,
                   NONE_I32)  # fmt: skip


@pjit
def linear_rows(x, wl, K, T, N, packed, parts, s_x, scale, bias, has_bias, q, s):
    """Rows of ``linear(x)`` (T, N) into a job buffer, then per row GELU and the int8 codes
    into ``q`` (T, N) and scales into ``s``. Needs N % 48 == 0."""
    G = K // 4
    NB = N // NC
    RB = (T + MR - 1) // MR
    RG = RT * MR  # rows a pass: their outputs (fc1: 192 kB) stay in L2
    for p in numba.prange(parts):
        w = all_weights(wl, NB, G, packed)  # every block, spread to bytes once a job
        sums = np.empty(RG, dtype=np.int32)
        buf = np.empty(RG * N, dtype=np.float32)
        b0, b1 = p * RB // parts, (p + 1) * RB // parts
        for c0 in range(b0, b1, RT):
            r0, r1 = c0 * MR, min(min(c0 + RT, b1) * MR, T)
            _rowsums(x, K, r0, r1, sums)
            for nb in range(NB):
                for t0 in range(r0, r1, MR):
                    if T - t0 <= SHORT:  # a last tile of 1 or 2 rows: one row at a time
                        for t in range(t0, T):
                            a0, a1, a2 = _tile1(x, w, G, K, t, nb)
                            n = nb * NC
                            _store3(buf, (t - r0) * N + n, a0, a1, a2, sums[t - r0], s_x[t], scale, n, bias,
                                         has_bias, False)  # fmt: skip
                        continue
                    tile = _tile(x, w, G, K, t0, T, nb)
                    for r in range(min(MR, T - t0)):
                        t, n = t0 + r, nb * NC
                        a0, a1, a2 = tile[r * NV], tile[r * NV + 1], tile[r * NV + 2]
                        _store3(buf, (t - r0) * N + n, a0, a1, a2, sums[t - r0], s_x[t], scale, n, bias,
                                     has_bias, False)  # fmt: skip
            for t in range(r0, r1):
                h = buf[(t - r0) * N : (t - r0 + 1) * N]
                s[t] = quantize_with(h, q[t], gelu_row(h, h))


@pjit
def int_rows(x, wl, K, T, N, packed, parts, R, c, g, e, B, Bf, has_bias, out, res, has_res, gelu, qmax, q, Rq,
             norm, Gn, Bn, E, qn, Rn):  # fmt: skip
    """A ternary layer in integer numerics in one pass, as ``avx2.int_rows`` (its signature;
    bound by ``linear.bind_int_linear``): 64 rows at a time, their exact int32 sums into a
    job buffer (in L2), then each row's end, ``intops.finish_int_row``. Needs N % 48 == 0."""
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
            for nb in range(NB):
                for t0 in range(r0, r1, MR):
                    if T - t0 <= SHORT:  # a last tile of 1 or 2 rows: one row at a time
                        for t in range(t0, T):
                            a0, a1, a2 = _tile1(x, w, G, K, t, nb)
                            o, xs = (t - r0) * N + nb * NC, sums[t - r0]
                            substore(buf, o, a0, xs)  # sum u x - sum x = sum w x
                            substore(buf, o + 16, a1, xs)
                            substore(buf, o + 32, a2, xs)
                        continue
                    tile = _tile(x, w, G, K, t0, T, nb)
                    for r in range(min(MR, T - t0)):
                        t = t0 + r
                        for v in range(NV):
                            substore(buf, (t - r0) * N + nb * NC + 16 * v, tile[r * NV + v], sums[t - r0])
            for t in range(r0, r1):
                finish_int_row(buf[(t - r0) * N : (t - r0 + 1) * N], t, R, c, g, e, B, Bf, has_bias, out, res, has_res,
                               gelu, qmax, q, Rq, norm, Gn, Bn, E, qn, Rn, h, f)  # fmt: skip


def bind_rows(rows, x_q, s_x, w: VNNIWeights, scale, bias, has_bias, q, s):
    """``(kernel, args)`` of the one-pass fc1 + GELU + codes kernel ``rows`` (this module's
    :func:`linear_rows` or its twin ``avx2.linear_rows``), bound to these arrays, as
    :func:`bind_tiled`; N % 48 == 0."""
    x, K = prepared(x_q, w)
    T, parts = x_q.shape[0], numba.get_num_threads()
    return rows, (x, w.wl, K, T, w.n, w.packed, parts, s_x, scale, bias, has_bias, q, s)
