"""The integer rules of ``tinyvit158/integer.py`` in torch int64, operation for operation, for
the PyTorch twin of ``numerics="integer"`` (``QATViT``): the same integers on any device.

Integer products of codes are taken in float64, exact because every partial sum stays
below 2**53 (``|acc| <= 127 K`` for codes; ``L qmax N`` for P v), then converted back.
"""

from __future__ import annotations

import math

import torch

from tinyvit158 import constants
from tinyvit158 import integer as ref

I64 = torch.int64
F64 = torch.float64
ONE, SAT, MANTISSA = ref.ONE, ref.SAT, ref.MANTISSA


def round_div(a: torch.Tensor, b) -> torch.Tensor:
    """``floor((2a + b) / (2b))`` for ``b > 0`` (``integer.round_div``)."""
    return torch.div(2 * a + b, 2 * b, rounding_mode="floor")


def shift_round(a: torch.Tensor, k: int) -> torch.Tensor:
    """``integer.shift_round``: ``round_div(a, 2**k)`` as ``(a + 2**(k-1)) >> k``."""
    return torch.bitwise_right_shift(a + (1 << (k - 1)), k)


def codes(v: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``integer.codes``: symmetric absmax codes of the rows of ``v`` and ``m = max |v|``."""
    m = v.abs().amax(dim=-1, keepdim=True)
    safe = m.clamp_min(1)
    q = torch.sign(v) * torch.div(2 * qmax * v.abs() + safe, 2 * safe, rounding_mode="floor")
    return torch.where(m == 0, torch.zeros_like(q), q), m[..., 0]


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """``integer.isqrt``: floor(sqrt(v)) for int64 ``0 <= v < 2**53``."""
    r = torch.floor(torch.sqrt(v.to(F64))).to(I64)
    r = torch.where(r * r > v, r - 1, r)
    return torch.where((r + 1) * (r + 1) <= v, r + 1, r)


def dyadic(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``integer.dyadic`` of float scales: ``(g, e)`` with ``scale ~ g * 2**-e``."""
    s = scale.to(F64)
    f, x = torch.frexp(s)
    g = torch.round(torch.ldexp(f, torch.tensor(MANTISSA, dtype=F64, device=s.device))).to(I64)
    e = MANTISSA - x.to(I64)
    zero = s == 0
    return torch.where(zero, 0, g), torch.where(zero, 0, e)


def to_q16(x: torch.Tensor) -> torch.Tensor:
    """``integer.to_q16``: ``rint(x * 2**16)`` in float64."""
    return torch.round(x.to(F64) * ONE).to(I64)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of integer codes, exact (float64 sums below 2**53)."""
    return torch.round(a.to(F64) @ b.to(F64).transpose(-1, -2)).to(I64)


def linear(q, R, w_codes, g, e, B, qmax: int = ref.ACT_QMAX) -> torch.Tensor:
    """``integer.linear``: ``clamp(round_div(acc R g, qmax 2**e) + B)``."""
    acc = int_matmul(q, w_codes)
    y = round_div(acc * R[..., None] * g, qmax * torch.bitwise_left_shift(torch.ones_like(e), e))
    if B is not None:
        y = y + B
    return y.clamp(-SAT, SAT)


def layer_norm_codes(z: torch.Tensor, G: torch.Tensor, B: torch.Tensor, E: int, qmax: int = ref.ACT_QMAX):
    """``integer.layer_norm_codes``: the codes of the integer LayerNorm's output and their R."""
    D = z.shape[-1]
    mu = round_div(z.sum(dim=-1, keepdim=True), D)
    d = z - mu
    var = round_div((d * d).sum(dim=-1, keepdim=True), D) + E
    s = isqrt(var)
    q, m = codes(G * d + B * s, qmax)
    return q, round_div(m, s[..., 0]).clamp_max(SAT)


def gelu(h: torch.Tensor) -> torch.Tensor:
    """``integer.gelu`` (i-GELU), Q16."""
    u = shift_round(h.abs() * ref.INV_SQRT2, 16)
    t = torch.clamp(u, max=-constants.GELU_B) + constants.GELU_B
    erf = shift_round(constants.GELU_A * t * t, 32) + ONE
    return shift_round(h * (ONE + torch.sign(h) * erf), 17)


def exp_neg(x: torch.Tensor) -> torch.Tensor:
    """``integer.exp_neg`` (i-exp) of Q16 values ``x <= 0``."""
    z = torch.div(-x, ref.LN2, rounding_mode="floor")
    p = x + z * ref.LN2
    poly = shift_round(constants.EXP_A * (p + constants.EXP_B) ** 2, 32) + constants.EXP_C
    return torch.where(z > 62, torch.zeros_like(poly), torch.bitwise_right_shift(poly, z.clamp_max(62)))


def softmax_codes(s: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """``integer.softmax_codes``: probability codes of Q16 score rows."""
    e = exp_neg(s - s.amax(dim=-1, keepdim=True))
    L = (1 << bits) - 1
    j = round(-math.log2(clip))
    return torch.clamp(round_div(L * e * (1 << j), e.sum(dim=-1, keepdim=True)), max=L)
