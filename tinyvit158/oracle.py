"""The float64 oracle: the specification of a ternary ViT, written to be read top to bottom.

It applies the same quantizers as the engine (``quant.py``), then does every matmul,
norm and softmax in float64 NumPy. The fast engine (``engine.py``) must agree with it:
integer accumulators exactly, logits to float32 rounding.

    image [B, 3, H, W] -> patches [B, N, 3*p*p] -> patch embedding [B, N, D]
    -> prepend cls, add position embedding [B, N+1, D]
    -> depth x Block:  x = x + Attn(LN1(x));  x = x + MLP(LN2(x))
    -> final LN, take cls [B, D] -> head -> logits [B, classes]

A ternary linear (qkv, proj, fc1, fc2; patch embedding and head as the config says):
    x_q, s_x = quantize_activations(x)      # int8 codes, one scale per token
    acc = x_q @ W_q.T                       # exact integers (float64 holds them exactly)
    y = acc * s_x * gamma + bias

Attention is float (softmax(q k^T / sqrt(hd)) v) or, with ``attention="int8"``, fully
quantized (Q-ViT): q and k as codes per token and head, v per head and channel, exact
integer q k^T and P v, the probabilities as unsigned codes (:meth:`Oracle.int8_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from tinyvit158.quant import ACT_QMAX, code_max, quantize_activations, quantize_probabilities
from tinyvit158.weights import Checkpoint

F64 = np.float64
_erf = np.vectorize(math.erf, otypes=[F64])


# -- references ------------------------------------------------------------------------
def patchify(images: np.ndarray, p: int) -> np.ndarray:
    """[B, C, H, W] -> [B, N, C*p*p], patches row-major, each flattened (c, row, col) like a conv weight."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, p, gw, p)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as torch
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, torch ``nn.GELU()``'s default."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


Quantizer = Callable[..., tuple[np.ndarray, np.ndarray]]


def default_quantizer(x: np.ndarray, site: str, qmax: int = ACT_QMAX):
    """The absmax quantizer (docs/FORMAT.md) over the last axis; ``site`` names the layer (or the
    attention's q, k, v) it feeds (unused here)."""
    return quantize_activations(x, qmax)


def default_prob_quantizer(p: np.ndarray, site: str, bits: int, clip: float = 1.0):
    """Attention probabilities to unsigned codes (``quant.quantize_probabilities``)."""
    return quantize_probabilities(p, bits, clip)


class Oracle:
    """The float64 model of a checkpoint.

    Parameters
    ----------
    ckpt : Checkpoint
    quantizer : callable (x, site, qmax) -> (x_q, s_x), optional
        Replaces the activation quantizer at every site; tests use it to replay the
        engine's int8 codes where the two legitimately round a tie differently.
    prob_quantizer : callable (p, site, bits, clip) -> (p_q, mult), optional
        Likewise for the probabilities of int8 attention (codes of ``p * mult``).
    """

    def __init__(
        self, ckpt: Checkpoint, quantizer: Quantizer = default_quantizer, prob_quantizer=default_prob_quantizer
    ):
        self.cfg = ckpt.config
        self.quantizer = quantizer
        self.prob_quantizer = prob_quantizer
        self.trace: dict[str, np.ndarray] | None = None  # stage -> output, when a dict (notebooks)
        self.p = {k: v.astype(F64) for k, v in ckpt.tensors.items() if not k.endswith("_packed")}
        self.ternary = {}  # layer -> (codes as float64, gamma, bias)
        self.float = {}  # layer -> (weight (out, in), bias)
        for layer in self.cfg.linear_shapes():
            if self.cfg.is_ternary(layer):
                codes, gamma, bias = ckpt.ternary(layer)
                self.ternary[layer] = (codes.astype(F64), gamma.astype(F64), None if bias is None else bias.astype(F64))
            else:
                bias = ckpt.tensors.get(f"{layer}.bias")
                self.float[layer] = (ckpt.float_weight(layer).astype(F64), bias.astype(F64))

    # -- layers ------------------------------------------------------------------------
    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return layer_norm(x, self.p[f"{name}.weight"], self.p[f"{name}.bias"], self.cfg.norm_eps)

    def accumulate(self, x_q: np.ndarray, layer: str) -> np.ndarray:
        """Integer accumulators ``x_q @ W_q.T`` of a ternary layer (exact in float64)."""
        return x_q.astype(F64) @ self.ternary[layer][0].T

    def linear(self, x: np.ndarray, layer: str) -> np.ndarray:
        """[..., in] -> [..., out]; ternary layers quantize their input per token first."""
        if layer in self.float:
            w, b = self.float[layer]
            return x @ w.T + b
        _, gamma, bias = self.ternary[layer]
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (T, in): one row per token
        if self.cfg.bitlinear_norm:
            x = self.norm(x, f"{layer}.norm")
        x_q, s_x = self.quantizer(x, layer)  # int8 (T, in), scale (T,)
        acc = self.accumulate(x_q, layer)  # (T, out), integers
        y = acc * s_x[:, None] * gamma[None, :]
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, -1)

    def patch_embed(self, images: np.ndarray) -> np.ndarray:
        patches = patchify(images, self.cfg.patch_size)  # (B, N, C*p*p)
        return self.linear(patches, "patch_embed.proj")  # (B, N, D)

    def attention(self, x: np.ndarray, i: int) -> np.ndarray:
        B, N, D = x.shape
        H, hd = self.cfg.heads, self.cfg.head_dim
        qkv = self.linear(x, f"blocks.{i}.attn.qkv")  # (B, N, 3D)
        q, k, v = qkv.reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        if self.cfg.attention == "int8":
            o = self.int8_attention(q, k, v, i)
        else:
            attn = softmax(q @ k.transpose(0, 1, 3, 2) * hd**-0.5)  # (B, H, N, N)
            self._keep(f"blocks.{i}.attn", attn)
            o = attn @ v  # (B, H, N, hd)
        o = o.transpose(0, 2, 1, 3).reshape(B, N, D)  # (B, N, D), heads concatenated
        return self.linear(o, f"blocks.{i}.attn.proj")

    def int8_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, i: int) -> np.ndarray:
        """Fully quantized attention (Q-ViT) of q, k, v (B, H, N, hd) -> (B, H, N, hd).

        q, k: absmax codes per token and head (Q K^T sums over hd, so a token's scale
        factors out); v: per head and channel over the image's tokens (P V sums over tokens,
        so v's scale must not vary by token); probabilities: min(rint(p * L / clip), L),
        L = 2**bits - 1, clip = ``attention_prob_clip``.
        """
        cfg, site = self.cfg, f"blocks.{i}.attn"
        if cfg.qk_norm:  # Q-ViT's information rectification: LayerNorm over hd, shared by the heads
            q, k = self.norm(q, f"{site}.q_norm"), self.norm(k, f"{site}.k_norm")
        qmax = code_max(cfg.attention_bits)
        q_q, s_q = self.quantizer(q, f"{site}.q", qmax)  # int8 (B, H, N, hd), scales (B, H, N)
        k_q, s_k = self.quantizer(k, f"{site}.k", qmax)
        v_q, s_v = self.quantizer(v.transpose(0, 1, 3, 2), f"{site}.v", qmax)  # (B, H, hd, N), scales (B, H, hd)
        acc = q_q.astype(F64) @ k_q.astype(F64).transpose(0, 1, 3, 2)  # (B, H, N, N), exact integers
        attn = softmax(acc * s_q[..., :, None] * s_k[..., None, :] * cfg.head_dim**-0.5)
        self._keep(site, attn)
        # uint8 (B, H, N, N), codes of p * mult (mult = L / attention_prob_clip)
        p_q, mult = self.prob_quantizer(attn, f"{site}.p", cfg.attention_prob_bits, cfg.attention_prob_clip)
        acc = p_q.astype(F64) @ v_q.astype(F64).transpose(0, 1, 3, 2)  # (B, H, N, hd), exact integers
        return acc * s_v[..., None, :] / mult

    def mlp(self, x: np.ndarray, i: int) -> np.ndarray:
        h = self.linear(x, f"blocks.{i}.mlp.fc1")  # (B, N, hidden)
        h = gelu(h)
        return self.linear(h, f"blocks.{i}.mlp.fc2")  # (B, N, D)

    def block(self, x: np.ndarray, i: int) -> np.ndarray:
        x = x + self.attention(self.norm(x, f"blocks.{i}.norm1"), i)
        x = x + self.mlp(self.norm(x, f"blocks.{i}.norm2"), i)
        return x

    # -- model -------------------------------------------------------------------------
    def _keep(self, stage: str, x: np.ndarray) -> np.ndarray:
        if self.trace is not None:
            self.trace[stage] = x
        return x

    def forward_features(self, images: np.ndarray) -> np.ndarray:
        """Normalized images [B, C, H, W] -> final-normed tokens [B, N+1, D]."""
        images = np.asarray(images, dtype=F64)
        x = self._keep("patch_embed", self.patch_embed(images))  # (B, N, D)
        cls = np.broadcast_to(self.p["cls_token"], (x.shape[0], 1, x.shape[2]))
        x = self._keep("tokens", np.concatenate([cls, x], axis=1) + self.p["pos_embed"])  # (B, N+1, D)
        for i in range(self.cfg.depth):
            x = self._keep(f"blocks.{i}", self.block(x, i))
        return self._keep("norm", self.norm(x, "norm"))

    def forward_head(self, x: np.ndarray) -> np.ndarray:
        return self._keep("logits", self.linear(x[:, 0], "head"))  # cls token -> (B, classes)

    def forward(self, images: np.ndarray) -> np.ndarray:
        return self.forward_head(self.forward_features(images))

    __call__ = forward
