"""int8 x ternary on any CPU: a register tile of float32 vectors, exact below K = 132,104.

The generic path's fast kernel. Numba's plain loops reach 40-50 GOP/s on these shapes
(a dot product per output: the horizontal sum at its end costs as much as the K / 16
vector steps before it; int16 and float32 variants of it measured the same). This kernel
keeps a 6-token x 16-channel tile of sums in 6 vector registers and, per input channel k,
broadcasts 6 activations and adds them times one vector of 16 weights: no horizontal sums.
The vectors are LLVM's portable ``<16 x float>`` (``kernels/simd.py``): one zmm register
with AVX-512, two ymm with AVX2, four q registers on ARM NEON; only the VNNI kernel needs
x86 instructions.

Why float32 is exact here: every activation is an integer in [-127, 127] and every weight
is -1, 0 or +1, so each product and each partial sum is an integer with
``|sum| <= 127 K``; float32 represents every integer up to 2**24 exactly, so for
``K <= 2**24 // 127 = 132,104`` (every ViT) no step rounds and the result equals the
int64 reference bit for bit. Wider layers take the int32 loops (``linear._matmul_dot4``).

Layout: weights in blocks of 16 output channels, ``wb[block, k, c]`` (int8, N padded to a
multiple of 16 with zeros): the 16 weights one step needs are one 16-byte load.
"""

from __future__ import annotations

import numba
import numpy as np

from tinyvit158.kernels.simd import dequant_store, fbcast, ffma, fload_i8, ftoi, fzero, vstore

MR = 6  # tokens per tile: 6 sum vectors (12 ymm registers under AVX2, of 16)
NC = 16  # output channels per block
K_EXACT = (1 << 24) // 127  # largest K whose sums stay exact in float32


class PortableWeights:
    """Ternary codes (N, K) laid out for the tile: ``wb[block, k, c]``, int8, 1 byte a weight."""

    def __init__(self, codes: np.ndarray):
        n, k = codes.shape
        self.n, self.k = n, k
        self.np_ = -(-n // NC) * NC
        w = np.zeros((self.np_, k), dtype=np.int8)
        w[:n] = codes
        self.wb = np.ascontiguousarray(w.reshape(self.np_ // NC, NC, k).transpose(0, 2, 1)).reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.wb.nbytes

    def codes(self) -> np.ndarray:
        w = self.wb.reshape(self.np_ // NC, self.k, NC).transpose(0, 2, 1).reshape(self.np_, self.k)
        return np.ascontiguousarray(w[: self.n])


@numba.njit(cache=True)
def _tile(xf, wb, K, nb):
    """Sums of one 6 x 16 tile, in float32 (exact, see the module docstring), from the
    tile's 6 rows of activations ``xf`` (float32, 6 x K)."""
    a0 = a1 = a2 = a3 = a4 = a5 = fzero()
    w0 = nb * K * NC
    for k in range(K):
        w = fload_i8(wb, w0 + k * NC)
        a0 = ffma(fbcast(xf, k), w, a0)
        a1 = ffma(fbcast(xf, K + k), w, a1)
        a2 = ffma(fbcast(xf, 2 * K + k), w, a2)
        a3 = ffma(fbcast(xf, 3 * K + k), w, a3)
        a4 = ffma(fbcast(xf, 4 * K + k), w, a4)
        a5 = ffma(fbcast(xf, 5 * K + k), w, a5)
    return a0, a1, a2, a3, a4, a5


@numba.njit(parallel=True, cache=True)
def _tiles(x, wb, K, T, N, parts, fused, s_x, scale, bias, has_bias, out, accumulate, acc32):
    """Every tile of (T, N), ``parts`` jobs of equal numbers of tiles. ``fused`` (N % 16 ==
    0): dequantized (the reference's float32 operations) into ``out``, flat (T * N), added
    to it when ``accumulate``; else int32 sums into ``acc32`` (T, N)."""
    NB = (N + NC - 1) // NC
    RB = (T + MR - 1) // MR
    U = RB * NB
    for p in numba.prange(parts):
        stage = np.empty(MR * NC, dtype=np.int32)
        xf = np.empty(MR * K, dtype=np.float32)  # the current tile's rows, as float32
        have = -1
        for u in range(p * U // parts, (p + 1) * U // parts):
            nb, t0 = u % NB, (u // NB) * MR  # consecutive units share the tile's activations
            if t0 != have:
                have = t0
                for r in range(MR):  # rows past the last (T - 1) repeat it: summed, never stored
                    xr = min(t0 + r, T - 1) * K
                    for k in range(K):
                        xf[r * K + k] = np.float32(x[xr + k])
            tile = _tile(xf, wb, K, nb)
            for r in range(min(MR, T - t0)):
                t = t0 + r
                a = ftoi(tile[r])
                if fused:
                    dequant_store(out, t * N + nb * NC, a, 0, s_x[t], scale, nb * NC, bias, has_bias, accumulate)
                else:
                    vstore(stage, 0, a)
                    for n in range(nb * NC, min(nb * NC + NC, N)):
                        acc32[t, n] = stage[n - nb * NC]


_NONE_F32 = np.empty(0, dtype=np.float32)
_NONE_I32 = np.empty((0, 0), dtype=np.int32)


def matmul(x_q: np.ndarray, w: PortableWeights, acc: np.ndarray) -> np.ndarray:
    """int32 (T, N) sums into ``acc``; inputs checked by the caller (kernels.linear), K <= K_EXACT."""
    T = x_q.shape[0]
    e = _NONE_F32
    _tiles(x_q.reshape(-1), w.wb, w.k, T, w.n, numba.get_num_threads(), False, e, e, e, False, e, False, acc)
    return acc


def linear(x_q, s_x, w: PortableWeights, scale, bias, has_bias, out, accumulate) -> np.ndarray:
    """float32 (T, N) into ``out``, bit-identical to ``linear.linear_ref``, as
    ``vnni.bind_tiled``'s call; the caller checks that N % 16 == 0."""
    T, flat = x_q.shape[0], out.reshape(-1)
    parts = numba.get_num_threads()
    _tiles(x_q.reshape(-1), w.wb, w.k, T, w.n, parts, True, s_x, scale, bias, has_bias, flat, accumulate, _NONE_I32)
    return out
