"""Bit-packed storage of ternary weights: ``ternary2`` (2 bits) and ``ternary3`` (1.6 bits).

Both formats pack each row (output channel) of a ternary matrix ``W[N, K]`` independently
into ``ceil(K / per_byte)`` bytes; the tail of a row is padded with zero *weights*, and K
is stored beside the bytes (in the weight file it is the layer's in_features), so no
padding ever reaches a result. Unpacking rejects codes that no weight maps to, and padding
that is not zero, with a :class:`~tinyvit158.errors.PackingError`.

ternary2 -- 2 bits per weight, 4 weights per byte, 16x smaller than float32
    code:   0 -> 0,  1 -> +1,  2 -> -1,  3 -> invalid   (so a zero byte is four zeros)
    weight  j of a row lives in byte j // 4, bits 2*(j % 4) .. 2*(j % 4) + 1
    decode: w = (c & 1) - (c >> 1)
    bytes per row: ceil(K / 4);  bits per weight: 2.0

ternary3 ("1.6-bit") -- 5 trits per byte, base 3, 20x smaller than float32
    trit:   t = w + 1 in {0, 1, 2}                      (-1, 0, +1 -> 0, 1, 2)
    byte:   b = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4        (weights 5i .. 5i+4 of the row)
    valid bytes are 0..242 (3**5 = 243 <= 256); 243..255 are invalid
    bytes per row: ceil(K / 5);  bits per weight: 8 / 5 = 1.6, i.e. 99.1% of the
    log2(3) = 1.585 bits a ternary digit carries.
"""

from __future__ import annotations

import numpy as np

from tinyvit158.errors import PackingError

FORMATS = {"ternary2": 4, "ternary3": 5}  # weights per byte
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)


def per_byte(fmt: str) -> int:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise PackingError(f"unknown packing {fmt!r}; use one of {', '.join(FORMATS)}") from None


def packed_cols(k: int, fmt: str) -> int:
    """Bytes per packed row of K weights: ``ceil(K / 4)`` or ``ceil(K / 5)``."""
    return -(-k // per_byte(fmt))


def bits_per_weight(fmt: str) -> float:
    return 8.0 / per_byte(fmt)


def _check_ternary(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] < 1:
        raise PackingError(f"expected a 2-D ternary matrix (out, in) with in >= 1, found shape {w.shape}")
    if not np.issubdtype(w.dtype, np.integer):
        raise PackingError(f"expected integer ternary codes, found dtype {w.dtype}; use quant.ternarize first")
    if np.any((w < -1) | (w > 1)):
        raise PackingError("expected weights in {-1, 0, +1}; use quant.ternarize first")
    return w.astype(np.int8)


def _padded(w: np.ndarray, per: int) -> np.ndarray:
    """Rows padded with zero weights to a multiple of ``per``, as (N, bytes, per)."""
    n, k = w.shape
    cols = -(-k // per)
    out = np.zeros((n, cols * per), dtype=np.int8)
    out[:, :k] = w
    return out.reshape(n, cols, per)


def pack_ternary2(w: np.ndarray) -> np.ndarray:
    """Pack ternary ``w[N, K]`` into uint8 ``[N, ceil(K/4)]`` (see module docstring)."""
    groups = _padded(_check_ternary(w), 4)
    codes = np.where(groups < 0, 2, groups).astype(np.uint8)  # -1, 0, +1 -> 2, 0, 1
    return np.bitwise_or.reduce(codes << _SHIFT2, axis=2).astype(np.uint8)


def pack_ternary3(w: np.ndarray) -> np.ndarray:
    """Pack ternary ``w[N, K]`` into uint8 ``[N, ceil(K/5)]`` (see module docstring)."""
    groups = _padded(_check_ternary(w), 5)
    trits = (groups + 1).astype(np.uint8)  # -1, 0, +1 -> 0, 1, 2
    return (trits * _POW3).sum(axis=2, dtype=np.uint16).astype(np.uint8)  # <= 242


def _check_packed(packed: np.ndarray, k: int, fmt: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise PackingError(f"packed {fmt} weights must be uint8, found {packed.dtype}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise PackingError(f"K (in_features) must be a positive integer, found {k!r}")
    if packed.ndim != 2 or packed.shape[1] != packed_cols(int(k), fmt):
        raise PackingError(
            f"packed {fmt} weights for K={k} must have shape (N, {packed_cols(int(k), fmt)}), found {packed.shape}"
        )
    return packed


def _check_decoded(w: np.ndarray, invalid: np.ndarray, k: int, fmt: str) -> np.ndarray:
    if invalid.any():
        row, col = np.argwhere(invalid)[0]
        raise PackingError(
            f"invalid {fmt} code in row {row}, byte {col}: "
            f"{np.count_nonzero(invalid)} byte(s) hold codes no weight maps to (corrupt data?)"
        )
    if np.any(w[:, k:]):
        row = int(np.argwhere(np.any(w[:, k:], axis=1))[0, 0])
        raise PackingError(f"non-zero padding after weight K={k} in row {row} of {fmt} data (corrupt data?)")
    return np.ascontiguousarray(w[:, :k])


def unpack_ternary2(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary2`: int8 ``[N, K]`` in {-1, 0, +1}."""
    packed = _check_packed(packed, k, "ternary2")
    codes = (packed[:, :, None] >> _SHIFT2) & 3  # (N, bytes, 4)
    invalid = np.any(codes == 3, axis=2)
    w = (codes & 1).astype(np.int8) - (codes >> 1).astype(np.int8)  # 0, 1, 2 -> 0, +1, -1
    return _check_decoded(w.reshape(packed.shape[0], -1), invalid, k, "ternary2")


def unpack_ternary3(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary3`: int8 ``[N, K]`` in {-1, 0, +1}."""
    packed = _check_packed(packed, k, "ternary3")
    invalid = packed >= 243
    trits = (packed[:, :, None] // _POW3) % 3  # (N, bytes, 5)
    w = trits.astype(np.int8) - 1  # 0, 1, 2 -> -1, 0, +1
    return _check_decoded(w.reshape(packed.shape[0], -1), invalid, k, "ternary3")


def pack(w: np.ndarray, fmt: str) -> np.ndarray:
    """Pack a ternary matrix in the named format."""
    return {"ternary2": pack_ternary2, "ternary3": pack_ternary3}[_fmt(fmt)](w)


def unpack(packed: np.ndarray, k: int, fmt: str) -> np.ndarray:
    """Unpack the named format to int8 ``[N, K]``; raises PackingError on invalid data."""
    return {"ternary2": unpack_ternary2, "ternary3": unpack_ternary3}[_fmt(fmt)](packed, k)


def _fmt(fmt: str) -> str:
    per_byte(fmt)
    return fmt
