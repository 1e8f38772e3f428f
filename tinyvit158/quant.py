"""The two quantizers of a ternary ViT, shared by the exporter, the oracle and the engine.

Weights (at export, BitNet b1.58 / ViT-1.58b "absmean"):
    gamma = mean(|W|)                       over the tensor, or over each output row
    W_q   = clip(round(W / (gamma + eps)), -1, 1)      in {-1, 0, +1}
    the stored scale is gamma, so W ~= W_q * gamma.

Activations (at run time, per token = per row, "absmax" to int8):
    s_x = max(max(|x|), 1e-5) / 127
    x_q = clip(round_half_even(x / s_x), -127, 127)
    so x ~= x_q * s_x with |x - x_q * s_x| <= s_x / 2.

Rounding is half-to-even everywhere (``numpy.rint``, ``torch.round``), so the three
implementations agree on ties. The functions compute in the dtype they are given: float32
in the engine and the trainer, float64 in the oracle.
"""

from __future__ import annotations

import numpy as np

from tinyvit158.errors import TinyViTError

WEIGHT_EPS = 1e-5  # keeps W / gamma finite for an all-zero group
ACT_EPS = 1e-5  # floor of a token's absmax, so an all-zero token gets a finite scale
ACT_QMAX = 127  # symmetric int8: -127..127 (-128 unused, so negation never overflows)


def ternarize(w: np.ndarray, granularity: str = "tensor", eps: float = WEIGHT_EPS):
    """Absmean ternarization of a float weight matrix.

    Parameters
    ----------
    w : ndarray, shape (N, K)
        Float weights, one row per output channel (timm / torch ``Linear`` layout).
    granularity : {"tensor", "channel"}
        One gamma for the whole tensor, or one per output row.
    eps : float
        Added to gamma before dividing.

    Returns
    -------
    codes : ndarray of int8, shape (N, K), values in {-1, 0, +1}
    scale : ndarray of float32, shape (N,)
        gamma per output row (a repeated value for ``"tensor"``).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise TinyViTError(f"ternarize expects a 2-D weight matrix (out, in), found shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise TinyViTError("ternarize found non-finite weights; check the checkpoint")
    if granularity == "tensor":
        gamma = np.full((w.shape[0], 1), np.mean(np.abs(w)))
    elif granularity == "channel":
        gamma = np.mean(np.abs(w), axis=1, keepdims=True)
    else:
        raise TinyViTError(f"granularity must be 'tensor' or 'channel', found {granularity!r}")
    codes = np.clip(np.rint(w / (gamma + eps)), -1, 1).astype(np.int8)
    return codes, gamma[:, 0].astype(np.float32)


def quantize_activations(x: np.ndarray, qmax: int = ACT_QMAX):
    """Per-token absmax int8 quantization of the last axis.

    Parameters
    ----------
    x : ndarray of float32 or float64, shape (..., K)
    qmax : int
        The largest code: 127 for int8; ``2**(bits - 1) - 1`` for narrower codes (the
        quantized attention's q, k, v), which still live in int8.

    Returns
    -------
    x_q : ndarray of int8, shape (..., K), values in [-127, 127]
    s_x : ndarray, shape (...), same float dtype as ``x``
        The scale of each row: ``x ~= x_q * s_x[..., None]``.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TinyViTError(f"quantize_activations expects float32 or float64, found {x.dtype}")
    absmax = np.max(np.abs(x), axis=-1)
    s_x = np.maximum(absmax, x.dtype.type(ACT_EPS)) / x.dtype.type(qmax)
    x_q = np.clip(np.rint(x / s_x[..., None]), -qmax, qmax).astype(np.int8)
    return x_q, s_x


def quantize_attention(x: np.ndarray, qmax: int):
    """The int8 attention's absmax quantizer of q, k, v (per row of the last axis): the scale
    ``s = max(max|x|, 1e-5) / qmax`` as in :func:`quantize_activations`, the codes
    ``clip(rint(x * (qmax / max(max|x|, 1e-5))), -qmax, qmax)``: one division per row and a
    product per element instead of a division per element (the same function in exact
    arithmetic; in float32 a product can land on the other side of a tie)."""
    x = np.asarray(x)
    t = x.dtype.type
    m = np.maximum(np.max(np.abs(x), axis=-1), t(ACT_EPS))
    s, inv = m / t(qmax), t(qmax) / m
    return np.clip(np.rint(x * inv[..., None]), -qmax, qmax).astype(np.int8), s


def code_max(bits: int) -> int:
    """The largest symmetric signed code of ``bits`` bits: 127 for 8, 7 for 4."""
    return 2 ** (bits - 1) - 1


def quantize_probabilities(p: np.ndarray, bits: int, clip: float = 1.0):
    """Attention probabilities in [0, 1] to unsigned codes: ``min(rint(p * M), L)`` with
    ``L = 2**bits - 1`` and ``M = L / clip`` (``clip`` = 1: Q-ViT's uniform quantizer on the
    attention map; smaller, a power of two: probabilities above ``clip`` saturate, the
    small ones keep more levels). The codes' scale is ``1 / M``. Returns (uint8 codes, M)."""
    levels = 2**bits - 1
    mult = levels / clip
    return np.clip(np.rint(p * mult), 0, levels).astype(np.uint8), mult


def dequantize(acc: np.ndarray, s_x: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None):
    """``y = acc * s_x[:, None] * w_scale[None, :] + bias`` in the dtype of ``s_x``."""
    y = acc.astype(s_x.dtype) * s_x[:, None] * w_scale.astype(s_x.dtype)[None, :]
    if bias is not None:
        y = y + bias.astype(s_x.dtype)
    return y
