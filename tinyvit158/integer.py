"""Integer-only numerics (``numerics="integer"``): the NumPy int64 reference, read top to bottom.

From the first codes to the logits every value is an integer, computed with additions,
multiplications, shifts, comparisons and floor division only, so every implementation
that follows these rules gets the same bits, whatever its order of operations. The rules
(``docs/FORMAT.md``, "Integer numerics"):

- **Q16**: every activation (the residual stream, every linear layer's output, q, k, v, the
  attention output, GELU's input and output, the logits) is an integer ``v`` standing for
  ``v / 2**16``; the residual stream saturates at ``+-SAT`` (a real 256).
- **round_div(a, b)**, ``b > 0``: ``floor((2 a + b) / (2 b))``, round half up; the only
  rounding there is (a shift right by ``k`` is ``round_div(a, 2**k)``).
- **codes** of a row ``v`` (any positive scale): ``m = max |v|``;
  ``q = sign(v) * floor((2 qmax |v| + m) / (2 m))`` (half away from zero; 0 where m = 0).
  With them goes ``R``, the row's absmax in Q16: the codes stand for ``q * R / qmax``.
- **a ternary or int8 linear**: ``acc = q @ W.T`` exact; its scale gamma as a dyadic
  ``g * 2**-e`` (``g`` a 16-bit mantissa); ``y = round_div(acc * R * g, qmax * 2**e) + B``
  with the bias ``B`` in Q16.
- **LayerNorm**: ``mu = round_div(sum z, D)``, ``d = z - mu``,
  ``var = round_div(sum d**2, D) + E`` (Q32, ``E = rint(eps * 2**32)``), ``s = isqrt(var)``
  (Q16), ``T = G * d + B * s`` (gamma, beta in Q16), and the codes of ``T`` with
  ``R = round_div(max |T|, s)``: the normalized row is ``T / (2**16 s)``.
- **GELU** (I-BERT's i-GELU): ``erf(u) ~ sign(u) (a (min(|u|, -b) + b)**2 + 1)``, a = -0.2888,
  b = -1.769, in Q16; ``GELU(x) = x (1 + erf(x / sqrt 2)) / 2``.
- **softmax** (I-BERT's i-exp): ``exp(x) = 2**-z exp(p)`` with ``z = floor(-x / ln 2)``,
  ``p = x + z ln 2`` in (-ln 2, 0], ``exp(p) ~ 0.3585 (p + 1.353)**2 + 0.344``, in Q16;
  probability codes ``min(round_div(L e * 2**j, sum e), L)`` (``L = 2**bits - 1``, clip
  ``2**-j``).

Every bound that keeps an intermediate within int64 is stated where it is used and
checked by ``tests/test_integer.py``. The model's parameters are the weight file's; the
integer constants are derived from them here (:class:`IntegerParams`) by exact float64
steps (scaling by powers of two, ``rint``, ``frexp``), so the file needs no new tensors.
"""

from __future__ import annotations

import math

import numpy as np

from tinyvit158 import constants
from tinyvit158.config import BLOCK_NORMS
from tinyvit158.constants import FRAC, INT_LN2, INT_ONE, INT_SAT, INV_SQRT2
from tinyvit158.errors import TinyViTError
from tinyvit158.oracle import patchify
from tinyvit158.quant import ACT_QMAX, code_max
from tinyvit158.weights import Checkpoint

I64 = np.int64
ONE, SAT, LN2 = INT_ONE, INT_SAT, INT_LN2
MANTISSA = 16  # bits of a dyadic scale's mantissa g (2**15 <= g <= 2**16)


# -- the rules ----------------------------------------------------------------------------
def round_div(a, b):
    """``floor((2a + b) / (2b))`` for ``b > 0``: a / b rounded half up, in int64."""
    a, b = np.asarray(a, I64), np.asarray(b, I64)
    return (2 * a + b) // (2 * b)


def shift_round(a, k: int):
    """``round_div(a, 2**k)`` for ``k >= 1`` as a shift: ``(a + 2**(k-1)) >> k`` (the same
    integer: floor division by a power of two is an arithmetic shift)."""
    return (np.asarray(a, I64) + (1 << (k - 1))) >> k


def codes(v: np.ndarray, qmax: int = ACT_QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax codes of the rows of ``v`` (last axis) and ``m = max |v|`` a row:
    ``q = sign(v) floor((2 qmax |v| + m) / (2 m))``, 0 where ``m = 0``. ``|v| < 2**54``."""
    v = np.asarray(v, I64)
    m = np.abs(v).max(axis=-1, keepdims=True)
    safe = np.maximum(m, 1)
    q = np.sign(v) * ((2 * qmax * np.abs(v) + safe) // (2 * safe))
    return np.where(m == 0, 0, q).astype(I64), m[..., 0]


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) of int64 ``0 <= v < 2**53``: float64's correctly rounded sqrt, then
    corrected by one step either way (exact for every such v)."""
    v = np.asarray(v, I64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(I64)
    r = np.where(r * r > v, r - 1, r)
    return np.where((r + 1) * (r + 1) <= v, r + 1, r)


def dyadic(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g, e)`` with ``scale ~ g * 2**-e``, ``g = rint(f * 2**16)`` for ``scale = f * 2**x``
    (``frexp``: f in [0.5, 1)), so ``2**15 <= g <= 2**16``; (0, 0) for a zero scale. Exact
    float64 steps: every implementation derives the same integers."""
    s = np.asarray(scale, np.float64)
    f, x = np.frexp(s)
    g = np.rint(np.ldexp(f, MANTISSA)).astype(I64)
    e = (MANTISSA - x).astype(I64)
    return np.where(s == 0, 0, g), np.where(s == 0, 0, e)


def to_q16(x: np.ndarray) -> np.ndarray:
    """A float tensor (parameters, the preprocessed image) in Q16: ``rint(x * 2**16)``, exact
    in float64."""
    return np.rint(np.ldexp(np.asarray(x, np.float64), FRAC)).astype(I64)


def linear(q: np.ndarray, R: np.ndarray, W: np.ndarray, g: np.ndarray, e: np.ndarray, B, qmax: int = ACT_QMAX):
    """``round_div(acc * R * g, qmax * 2**e) + B``, saturated at ``+-SAT``; acc = q @ W.T
    exact. Bound: ``|acc| <= qmax K``, ``R <= 2**24``, ``g <= 2**16``: ``|acc R g| < 2**62``
    for ``K <= 2**15``."""
    acc = q.astype(I64) @ W.astype(I64).T
    y = round_div(acc * R[..., None] * g, qmax * (np.int64(1) << e))
    return np.clip(y if B is None else y + B, -SAT, SAT)


def layer_norm_codes(z: np.ndarray, G: np.ndarray, B: np.ndarray, E: int, qmax: int = ACT_QMAX):
    """The integer LayerNorm of Q16 rows ``z`` (``|z| <= SAT``), straight to the codes of its
    output and their Q16 absmax ``R`` (at most SAT). Bounds, for D <= 2**12 and
    ``|gamma|, |beta| < 2**7``: ``|d| <= 2**25``, ``sum d**2 < 2**62``, ``var <= 2**50 + E``
    (isqrt's range), ``s <= 2**25``, ``|T| < 2**49`` (codes need ``2 qmax |T| < 2**63``)."""
    z = np.asarray(z, I64)
    D = z.shape[-1]
    mu = round_div(z.sum(axis=-1, keepdims=True), D)
    d = z - mu
    var = round_div((d * d).sum(axis=-1, keepdims=True), D) + E  # Q32
    s = isqrt(var)  # Q16, >= isqrt(E) > 0
    T = G * d + B * s
    q, m = codes(T, qmax)
    return q, np.minimum(round_div(m, s[..., 0]), SAT)


def gelu(h: np.ndarray) -> np.ndarray:
    """i-GELU of Q16 values ``|h| <= 2**25``, in Q16."""
    h = np.asarray(h, I64)
    u = shift_round(np.abs(h) * INV_SQRT2, FRAC)  # |h| / sqrt 2
    t = np.minimum(u, -constants.GELU_B) + constants.GELU_B  # in [B, 0]
    erf = shift_round(constants.GELU_A * t * t, 2 * FRAC) + ONE  # A t**2 + 1 in Q16: |A t t| < 2**48
    return shift_round(h * (ONE + np.sign(h) * erf), FRAC + 1)


def exp_neg(x: np.ndarray) -> np.ndarray:
    """i-exp of Q16 values ``x <= 0``, in Q16 (0 below 2**-31 of the max)."""
    x = np.asarray(x, I64)
    z = (-x) // LN2
    p = x + z * LN2  # in (-LN2, 0]
    poly = (
        shift_round(constants.EXP_A * (p + constants.EXP_B) ** 2, 2 * FRAC) + constants.EXP_C
    )  # |A (p + B)**2| < 2**48
    return np.where(z > 62, 0, poly >> np.minimum(z, 62))


def softmax_codes(s: np.ndarray, bits: int, clip: float) -> np.ndarray:
    """Probability codes of Q16 score rows: i-exp of ``s - max s``, then
    ``min(round_div(L e 2**j, sum e), L)`` for clip ``2**-j``."""
    e = exp_neg(s - s.max(axis=-1, keepdims=True))
    L = (1 << bits) - 1
    j = round(-math.log2(clip))
    return np.minimum(round_div(L * e * (1 << j), e.sum(axis=-1, keepdims=True)), L)


# -- the model ----------------------------------------------------------------------------
def attention(qkv: np.ndarray, heads: int, bits: int, prob_bits: int, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """The attention of Q16 ``qkv`` (B, N, 3 D): its Q16 output (B, N, D), before the proj
    layer's codes, and the probability codes (B, heads, N, N)."""
    B_, N, D3 = qkv.shape
    H, hd = heads, D3 // 3 // heads
    qh, kh, vh = np.asarray(qkv, I64).reshape(B_, N, 3, H, hd).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    qmax = code_max(bits)
    q_c, R_q = codes(qh, qmax)  # per token and head
    k_c, R_k = codes(kh, qmax)
    v_c, R_v = codes(vh.transpose(0, 1, 3, 2), qmax)  # per head and channel, over the tokens
    acc = q_c @ k_c.transpose(0, 1, 3, 2)  # (B, H, N, N), |acc| <= qmax**2 hd
    R_qk = shift_round(R_q[..., :, None] * R_k[..., None, :], FRAC)  # R_q R_k < 2**48
    t = round_div(acc * R_qk, qmax * qmax)  # the real q.k in Q16: |acc R_qk| < 2**59 for hd <= 2**13
    scores = shift_round(t * round(ONE / math.sqrt(hd)), FRAC)
    p = softmax_codes(scores, prob_bits, clip)
    L, j = (1 << prob_bits) - 1, round(-math.log2(clip))
    acc = p @ v_c.transpose(0, 1, 3, 2)  # (B, H, N, hd), |acc| <= L qmax N
    o = round_div(acc * R_v[..., None, :], L * qmax * (1 << j))  # Q16
    return o.transpose(0, 2, 1, 3).reshape(B_, N, H * hd), p


class IntegerParams:
    """A checkpoint's parameters as the integers the rules use: each linear layer's codes
    (ternary; the head's int8 per output channel), its scale's dyadic ``(g, e)`` and its bias
    in Q16; each LayerNorm's gamma and beta in Q16; the class token and position embedding
    in Q16. ``ternary_codes=False`` leaves the ternary layers' codes out (None), for a caller
    that reads them in its own layout (the engine)."""

    def __init__(self, ckpt: Checkpoint, ternary_codes: bool = True):
        cfg = self.cfg = ckpt.config
        self.eps = int(np.rint(np.ldexp(cfg.norm_eps, 2 * FRAC)))
        self.linear: dict[str, tuple] = {}
        for layer in cfg.linear_shapes():
            bias = ckpt.tensors.get(f"{layer}.bias")
            B = None if bias is None else to_q16(bias)
            if cfg.is_ternary(layer):
                scale = ckpt.tensors[f"{layer}.weight_scale"]
                w = ckpt.ternary(layer)[0].astype(I64) if ternary_codes else None
            else:  # a float layer becomes int8 codes, one absmax scale per output channel
                wf = ckpt.float_weight(layer).astype(np.float64)
                peak = np.abs(wf).max(axis=1)
                w = np.rint(wf * (ACT_QMAX / np.where(peak == 0, 1, peak))[:, None])
                scale = peak / ACT_QMAX
                w = w.astype(I64)
            g, e = dyadic(scale)
            if np.any(e < 0):  # a scale of 2**15 or more: no weight scale comes near
                raise TinyViTError(f"{layer}: a weight scale of 2**15 or more has no integer form here")
            self.linear[layer] = (w, g, e, B)
        self.norms = {
            name: (to_q16(ckpt.tensors[f"{name}.weight"]), to_q16(ckpt.tensors[f"{name}.bias"]))
            for name in [f"blocks.{i}.{norm}" for i in range(cfg.depth) for norm in BLOCK_NORMS] + ["norm"]
        }
        self.cls_token = to_q16(ckpt.tensors["cls_token"])
        self.pos_embed = to_q16(ckpt.tensors["pos_embed"])


class IntegerOracle:
    """The integer-only model of a checkpoint: normalized images in, Q16 logits out
    (:meth:`integers`; calling it gives their exact float64 view, as ``Oracle`` does).
    ``trace`` (a dict) keeps every stage's integers."""

    def __init__(self, ckpt: Checkpoint):
        self.cfg = ckpt.config
        self.p = IntegerParams(ckpt)
        self.trace: dict[str, np.ndarray] | None = None

    def _keep(self, stage: str, x: np.ndarray) -> np.ndarray:
        if self.trace is not None:
            self.trace[stage] = x
        return x

    def _linear(self, q, R, layer):
        w, g, e, B = self.p.linear[layer]
        return linear(q, R, w, g, e, B)

    def attention(self, x: np.ndarray, i: int) -> np.ndarray:
        """Block ``i``'s attention of Q16 tokens (B, N, D), through LayerNorm 1: Q16 (B, N, D)."""
        cfg, site = self.cfg, f"blocks.{i}"
        q, R = layer_norm_codes(x, *self.p.norms[f"{site}.norm1"], self.p.eps)
        qkv = self._keep(f"{site}.attn.qkv", self._linear(q, R, f"{site}.attn.qkv"))  # Q16 (B, N, 3D)
        o, p = attention(qkv, cfg.heads, cfg.attention_bits, cfg.attention_prob_bits, cfg.attention_prob_clip)
        self._keep(f"{site}.attn.p", p)
        q, R = codes(o)
        return self._keep(f"{site}.attn.proj", self._linear(q, R, f"{site}.attn.proj"))

    def mlp(self, x: np.ndarray, i: int) -> np.ndarray:
        site = f"blocks.{i}"
        q, R = layer_norm_codes(x, *self.p.norms[f"{site}.norm2"], self.p.eps)
        h = self._keep(f"{site}.mlp.fc1", self._linear(q, R, f"{site}.mlp.fc1"))
        h = self._keep(f"{site}.mlp.gelu", gelu(h))
        q, R = codes(h)
        return self._keep(f"{site}.mlp.fc2", self._linear(q, R, f"{site}.mlp.fc2"))

    def integers(self, images: np.ndarray) -> np.ndarray:
        """Normalized float images [B, C, H, W] -> int64 Q16 logits [B, classes]."""
        cfg = self.cfg
        x = to_q16(patchify(np.asarray(images, np.float32), cfg.patch_size))  # the input in Q16
        q, R = codes(x)
        x = self._keep("patch_embed", self._linear(q, R, "patch_embed.proj"))  # (B, N, D)
        cls = np.broadcast_to(self.p.cls_token, (x.shape[0], 1, x.shape[2]))
        x = np.clip(np.concatenate([cls, x], axis=1) + self.p.pos_embed, -SAT, SAT)
        for i in range(cfg.depth):
            x = np.clip(x + self.attention(x, i), -SAT, SAT)
            x = self._keep(f"blocks.{i}", np.clip(x + self.mlp(x, i), -SAT, SAT))
        q, R = layer_norm_codes(x[:, 0], *self.p.norms["norm"], self.p.eps)
        return self._keep("logits", self._linear(q, R, "head"))

    def forward(self, images: np.ndarray) -> np.ndarray:
        """The Q16 logits as float64 (exact: every integer below 2**53 is a float64)."""
        return self.integers(images).astype(np.float64) / ONE

    __call__ = forward
