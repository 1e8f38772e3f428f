"""int8 x ternary with AVX-512 VNNI: ``vpdpbusd`` reached from Numba.

The identity (DESIGN.md section 3). With weight codes stored as unsigned bytes
``u = w + 1`` in {0, 1, 2}:

    sum_k w[n, k] * x[t, k]  =  sum_k u[n, k] * x[t, k]  -  sum_k x[t, k]

so one ``vpdpbusd`` (unsigned bytes u times signed bytes x, four products summed into each
of 16 int32 lanes: 64 multiply-adds per instruction, exact, non-saturating) does the work,
and one row sum of x per token corrects it. |sum u x| <= 254 K, far below 2**31.

Layout (built once at load, as oneDNN lays out VNNI weights): output channels in blocks of
NC = 48; for each block and each group of 4 input channels, the 48 x 4 bytes are
contiguous, channel-major: ``wl[block, k // 4, c, k % 4]`` (c < 48). K is padded to a
multiple of 4 and N to a multiple of 48 with zero bytes; activations are padded with zero
rows and columns, so padding never reaches a result.

Micro-kernel: an 8-token x 48-channel tile kept in 24 zmm accumulators. Per group of 4
input channels it loads 3 x 64 weight bytes, broadcasts 4 activation bytes of each row, and
issues 24 ``vpdpbusd``; there is no horizontal reduction. Dequantization and bias are fused
into the tile's vector stores (for widths that are multiples of 48, i.e. every ViT layer;
others take the int32 tile path and dequantize in NumPy, the same float32 operations).
Measured on the 2-core AVX-512 machine, the tile alone (prototype, ``bench --kernels`` for
the whole call): 8 x 3 zmm reached 650-1,150 GOP/s on cifar10-tiny and DeiT-Small shapes,
against 150-230 for NumPy sgemm; 4 x 4, 6 x 4 and 12 x 2 tiles were within -30%..+10%.

The vector types and intrinsics it uses live in ``kernels/simd.py``. They exist only as
compiled code: under ``NUMBA_DISABLE_JIT=1`` the engine uses the generic kernel instead
(see ``kernels.ternary.kernel_path``).
"""

from __future__ import annotations

import numba
import numpy as np

from tinyvit158.kernels.simd import _dequant_store, _dpbusd, _vbroadcast4, _vload, _vload_u2, _vstore, _vzero

MR, NV = 8, 3  # tile: 8 tokens x 3 vectors of 16 output channels
NC = 16 * NV  # output channels per block


# The tile below is written out (generated once by a loop over rows and vectors): Numba
# keeps each named accumulator in its own register, which a Python list would not.
@numba.njit(cache=True)
def _tile(xp, wl, G, Kp, t0, nb):
    """One 8 x 48 tile: 24 zmm accumulators (returned as a tuple, row-major), 3 weight vectors,
    1 broadcast per row; ``wl`` in the 1-byte layout."""
    x0 = (t0 + 0) * Kp
    x1 = (t0 + 1) * Kp
    x2 = (t0 + 2) * Kp
    x3 = (t0 + 3) * Kp
    x4 = (t0 + 4) * Kp
    x5 = (t0 + 5) * Kp
    x6 = (t0 + 6) * Kp
    x7 = (t0 + 7) * Kp
    a00 = a01 = a02 = _vzero()
    a10 = a11 = a12 = _vzero()
    a20 = a21 = a22 = _vzero()
    a30 = a31 = a32 = _vzero()
    a40 = a41 = a42 = _vzero()
    a50 = a51 = a52 = _vzero()
    a60 = a61 = a62 = _vzero()
    a70 = a71 = a72 = _vzero()
    for g in range(G):
        wo = (nb * G + g) * 192  # 192 bytes a group: 4 code bytes per output channel
        w0, w1, w2 = _vload(wl, wo + 0), _vload(wl, wo + 64), _vload(wl, wo + 128)
        b = _vbroadcast4(xp, x0 + 4 * g)
        a00, a01, a02 = _dpbusd(a00, w0, b), _dpbusd(a01, w1, b), _dpbusd(a02, w2, b)
        b = _vbroadcast4(xp, x1 + 4 * g)
        a10, a11, a12 = _dpbusd(a10, w0, b), _dpbusd(a11, w1, b), _dpbusd(a12, w2, b)
        b = _vbroadcast4(xp, x2 + 4 * g)
        a20, a21, a22 = _dpbusd(a20, w0, b), _dpbusd(a21, w1, b), _dpbusd(a22, w2, b)
        b = _vbroadcast4(xp, x3 + 4 * g)
        a30, a31, a32 = _dpbusd(a30, w0, b), _dpbusd(a31, w1, b), _dpbusd(a32, w2, b)
        b = _vbroadcast4(xp, x4 + 4 * g)
        a40, a41, a42 = _dpbusd(a40, w0, b), _dpbusd(a41, w1, b), _dpbusd(a42, w2, b)
        b = _vbroadcast4(xp, x5 + 4 * g)
        a50, a51, a52 = _dpbusd(a50, w0, b), _dpbusd(a51, w1, b), _dpbusd(a52, w2, b)
        b = _vbroadcast4(xp, x6 + 4 * g)
        a60, a61, a62 = _dpbusd(a60, w0, b), _dpbusd(a61, w1, b), _dpbusd(a62, w2, b)
        b = _vbroadcast4(xp, x7 + 4 * g)
        a70, a71, a72 = _dpbusd(a70, w0, b), _dpbusd(a71, w1, b), _dpbusd(a72, w2, b)
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


class VNNIWeights:
    """Ternary weights re-laid out for the tile: unsigned codes u = w + 1, blocked by 48 channels.

    ``packed=False``: one byte per weight, ``wl[block, k // 4, c, k % 4]``.
    ``packed=True``: 2 bits per weight (a quarter of the bytes): the four codes of channel c
    and input group k // 4 share one byte, ``wl[block, k // 4, c] = sum_j u[c, 4 (k // 4) + j] << 2j``;
    each job spreads its block's codes to bytes once (``simd._vload_u2``), in cache, and
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


def _pad_rows_impl(x_q, tp, kp):
    """The row sums of int8 (T, K) (int32), and x flattened with rows and columns padded
    with zeros to (tp, kp); no copy when no padding is needed."""
    T, K = x_q.shape
    xsum = np.zeros(tp, dtype=np.int32)
    for t in numba.prange(T):
        s = np.int32(0)
        for k in range(K):
            s += np.int32(x_q[t, k])
        xsum[t] = s
    if T == tp and K == kp:
        return x_q.reshape(-1), xsum
    xp = np.zeros((tp, kp), dtype=np.int8)
    xp[:T, :K] = x_q
    return xp.reshape(-1), xsum


# small inputs (a batch-1 layer) are cheaper to scan on one thread than to fork and join
_pad_rows_serial = numba.njit(cache=True)(_pad_rows_impl)
_pad_rows_parallel = numba.njit(parallel=True, cache=True)(_pad_rows_impl)
_PARALLEL_PAD_BYTES = 1 << 17


def _pad_rows(x_q, tp, kp):
    fn = _pad_rows_parallel if x_q.size >= _PARALLEL_PAD_BYTES else _pad_rows_serial
    return fn(x_q, tp, kp)


_ROW_BLOCKS_PER_JOB = 8  # a job: one block of 48 channels x up to 64 tokens


@numba.njit(cache=True)
def _block_weights(wl, nb, G, packed, scratch):
    """The 1-byte layout of channel block ``nb``, and its block index in that array: the
    array itself when not packed, else ``scratch`` after spreading the 2-bit codes into it
    (once per job, then reused by every row tile of the job, from L1/L2)."""
    if not packed:
        return wl, nb
    for g in range(G):
        src = (nb * G + g) * 48
        dst = g * 192
        _vstore(scratch, dst, _vload_u2(wl, src))
        _vstore(scratch, dst + 64, _vload_u2(wl, src + 16))
        _vstore(scratch, dst + 128, _vload_u2(wl, src + 32))
    return scratch, 0


@numba.njit(parallel=True, cache=True)
def _matmul_tiles(xp, xsum, wl, G, Kp, Tp, Np, T, N, packed):
    NB = Np // NC
    RB = Tp // MR
    groups = (RB + _ROW_BLOCKS_PER_JOB - 1) // _ROW_BLOCKS_PER_JOB
    out = np.empty((T, N), dtype=np.int32)
    for job in numba.prange(groups * NB):
        nb = job % NB
        scratch = np.empty(G * 192 if packed else 0, dtype=np.uint8)
        w, wnb = _block_weights(wl, nb, G, packed, scratch)
        acc = np.empty(MR * NC, dtype=np.int32)
        n0 = nb * NC
        for rb in range((job // NB) * _ROW_BLOCKS_PER_JOB, min((job // NB + 1) * _ROW_BLOCKS_PER_JOB, RB)):
            t0 = rb * MR
            tile = _tile(xp, w, G, Kp, t0, wnb)
            for i in range(MR * NV):
                _vstore(acc, 16 * i, tile[i])
            for t in range(t0, min(t0 + MR, T)):
                r = (t - t0) * NC - n0
                for n in range(n0, min(n0 + NC, N)):
                    out[t, n] = acc[r + n] - xsum[t]  # sum u x - sum x = sum w x
    return out


@numba.njit(parallel=True, cache=True)
def _linear_tiles(xp, xsum, wl, G, Kp, Tp, Np, T, N, packed, s_x, scale, bias, has_bias, out, accumulate):
    """Tiles with dequantization fused into vector stores into ``out`` (flat T * N float32),
    added to it when ``accumulate``; needs N % 48 == 0 (all ViT widths)."""
    NB = Np // NC
    RB = Tp // MR
    groups = (RB + _ROW_BLOCKS_PER_JOB - 1) // _ROW_BLOCKS_PER_JOB
    for job in numba.prange(groups * NB):
        nb = job % NB
        scratch = np.empty(G * 192 if packed else 0, dtype=np.uint8)
        w, wnb = _block_weights(wl, nb, G, packed, scratch)
        for rb in range((job // NB) * _ROW_BLOCKS_PER_JOB, min((job // NB + 1) * _ROW_BLOCKS_PER_JOB, RB)):
            t0 = rb * MR
            tile = _tile(xp, w, G, Kp, t0, wnb)
            for r in range(min(MR, T - t0)):
                t = t0 + r
                for v in range(NV):
                    n = nb * NC + 16 * v
                    _dequant_store(
                        out, t * N + n, tile[r * NV + v], xsum[t], s_x[t], scale, n, bias, has_bias, accumulate
                    )
    return out


def _padded(x_q: np.ndarray, w: VNNIWeights):
    tp = -(-x_q.shape[0] // MR) * MR
    xp, xsum = _pad_rows(x_q, tp, w.kp)
    return xp, xsum, w.wl, w.kp // 4, w.kp, tp, w.np_, x_q.shape[0], w.n, w.packed


def matmul(x_q: np.ndarray, w: VNNIWeights) -> np.ndarray:
    """int32 (T, N) accumulators; inputs are checked by the caller (kernels.ternary)."""
    return _matmul_tiles(*_padded(x_q, w))


def linear(x_q, s_x, w: VNNIWeights, scale, bias, has_bias, out, accumulate) -> np.ndarray:
    """float32 (T, N), bit-identical to ``ternary.linear_ref``, written into ``out``
    (C-contiguous float32 (T, N), checked by the caller) or added to it when ``accumulate``."""
    if w.n % NC:  # a width the vector store would overrun: dequantize from the int32 tiles
        y = matmul(x_q, w).astype(np.float32) * s_x[:, None] * scale[None, :]
        y = y + bias if has_bias else y
        if accumulate:
            out += y
        else:
            out[...] = y
        return out
    _linear_tiles(*_padded(x_q, w), s_x, scale, bias, has_bias, out.reshape(-1), accumulate)
    return out
