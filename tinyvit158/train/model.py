"""A quantization-aware ViT in PyTorch with the engine's architecture, names and numerics.

Every ternary layer is a :class:`BitLinear`: latent float weights (what AdamW updates) are
ternarized on the fly with ``quant.py``'s absmean rule, and its input is quantized per
token to int8 with ``quant.py``'s absmax rule; both use straight-through gradients
(forward: the quantized value; backward: the identity). So the forward pass computes
``(x_q * s_x) @ (W_q * gamma).T + b``, which is the engine's ``acc * s_x * gamma + b``.

Tensor names follow timm (``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ...), so the
exporter is a name-preserving ternarize-and-pack.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinyvit158.config import ViTConfig
from tinyvit158.constants import ERF_P, ERF_Q, EXP32_INV_LN2, EXP32_LN2_HI, EXP32_LN2_LO, EXP32_MIN, EXP32_P
from tinyvit158.errors import TinyViTError
from tinyvit158.quant import ACT_EPS, ACT_QMAX, WEIGHT_EPS, code_max
from tinyvit158.train import intmath as im


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] (the engine's /255)."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """(x - mean) / std per channel, as ``image.normalize``."""
    mean = torch.tensor(cfg.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def ternarize_weight(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarization, ``quant.ternarize`` in torch: codes in {-1, 0, 1} and gamma
    (out, 1), both float32 and without gradients (the callers' estimators carry those).

    Computed as ``quant.ternarize`` computes it, in float64 with gamma rounded once to
    float32, so the exporter writes exactly the codes and gamma this forward pass uses: a
    trained checkpoint and its weight file are then one function at inference. (A float32
    mean differs from the float64 one in the last bit of gamma now and then; that moved
    logits by ~1e-7 and flipped downstream int8 codes at rounding ties: a checkpoint and
    its own weight file disagreed on about 20 of the 10,000 test images.)
    """
    with torch.no_grad():
        wd = w.double()
        if granularity == "tensor":
            gamma = wd.abs().mean().expand(w.shape[0], 1)
        else:
            gamma = wd.abs().mean(dim=1, keepdim=True)
        codes = torch.clamp(torch.round(wd / (gamma + WEIGHT_EPS)), -1, 1)
        return codes.to(w.dtype), gamma.to(w.dtype)


def latent_weights(codes: torch.Tensor, gamma: torch.Tensor, granularity: str) -> torch.Tensor:
    """Float weights whose absmean ternarization is ``codes`` and ``gamma`` (out,): codes x
    gamma / f, f the group's fraction of non-zero codes. Then mean |W| = gamma, and W / gamma
    is 0 or +-1/f with f <= 1, which rounds and clips back to the codes."""
    c = codes.double()
    nonzero = c.abs().mean(dim=1, keepdim=True) if granularity == "channel" else c.abs().mean().expand(len(c), 1)
    return (c * gamma.double().reshape(-1, 1) / nonzero.clamp_min(1e-12)).float()


def latent_state(ckpt, as_float: bool = False) -> dict[str, torch.Tensor]:
    """A ``QATViT`` state dict from a weight file (``weights.Checkpoint``): ternary layers as
    :func:`latent_weights`, every other tensor as stored (for fine-tuning from a file).
    ``as_float``: the ternary layers as ``codes x gamma`` instead, the file's function in a
    float model (a run whose every epoch is float)."""
    state = {}
    for name, t in ckpt.tensors.items():
        if name.endswith(".weight_packed"):
            layer = name[: -len(".weight_packed")]
            if as_float:
                w = torch.from_numpy(ckpt.dequantized(layer))
            else:
                codes, gamma, _ = ckpt.ternary(layer)
                w = latent_weights(torch.from_numpy(codes), torch.from_numpy(gamma), ckpt.config.scale_granularity)
            state[f"{layer}.weight"] = w
        elif not name.endswith(".weight_scale"):
            state[name] = torch.from_numpy(t.copy())
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].reshape(ckpt.config.dim, -1)
    return state


def quantize_activations(x: torch.Tensor, qmax: int = ACT_QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 (quant.quantize_activations in torch): codes (as float) and scales."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp_min(ACT_EPS) / qmax
    return torch.clamp(torch.round(x / s), -qmax, qmax), s


def quantize_attention(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.quantize_attention`` in torch: codes (as float) and scales (..., 1)."""
    m = x.abs().amax(dim=-1, keepdim=True).clamp_min(ACT_EPS)
    inv = torch.tensor(float(qmax), dtype=m.dtype, device=m.device) / m  # (scalar / tensor would be 1 / m * qmax)
    return torch.clamp(torch.round(x * inv), -qmax, qmax), m / qmax


def exp32(x: torch.Tensor) -> torch.Tensor:
    """``kernels.qattn.exp32`` (the engine's float32 exp for x <= 0) in PyTorch, operation
    for operation, so both give the same bits."""
    f = torch.float32

    def c(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=f, device=x.device)

    x = torch.clamp_min(x, c(EXP32_MIN))
    k = torch.floor(x * c(EXP32_INV_LN2) + c(0.5))
    r = (x - k * c(EXP32_LN2_HI)) - k * c(EXP32_LN2_LO)
    p = torch.full_like(r, EXP32_P[0])
    for coef in EXP32_P[1:]:
        p = p * r + c(coef)
    y = (p * (r * r) + r) + c(1.0)
    return y * torch.bitwise_left_shift(k.to(torch.int32) + 127, 23).view(f)


def lane_sum(e: torch.Tensor) -> torch.Tensor:
    """``kernels.qattn.lane_sum``: sums over the last axis in 16 lanes, then a fixed tree."""
    e = F.pad(e, (0, -e.shape[-1] % 16))
    blocks = e.reshape(*e.shape[:-1], -1, 16)
    acc = blocks[..., 0, :]
    for i in range(1, blocks.shape[-2]):
        acc = acc + blocks[..., i, :]
    for half in (8, 4, 2, 1):
        acc = acc[..., :half] + acc[..., half : 2 * half]
    return acc[..., 0]


def int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qmax: int,
    levels: int,
    keep: list | None = None,
    clip: float = 1.0,
) -> torch.Tensor:
    """Fully quantized attention (``kernels/qattn.py``'s rules) of q, k, v (B, H, N, hd).

    Training: fake quantization with straight-through estimators (q, k, v and the
    probabilities forward their quantized values, gradients pass as the identity).
    Inference: the engine's arithmetic, bit for bit: exact integer sums, the float32
    softmax in its specified order (:func:`exp32`, :func:`lane_sum`), the probability
    codes ``min(rint(p * M), L)`` (``M = L / clip``), the exact P V sums times ``(s_v / M)``
    in float64, rounded once to float32.
    ``keep``, a list, receives the attention map (training: before its codes are rounded).
    """
    q_c, s_q = quantize_attention(q, qmax)  # (B, H, N, hd), scales (B, H, N, 1)
    k_c, s_k = quantize_attention(k, qmax)
    v_c, s_v = quantize_attention(v.transpose(-1, -2), qmax)  # per channel over tokens: (B, H, hd, N), (B, H, hd, 1)
    scale = q.shape[-1] ** -0.5
    mult = levels / clip  # exact: clip is a power of two
    if torch.is_grad_enabled():
        attn = torch.softmax(ste(q, q_c * s_q) @ ste(k, k_c * s_k).transpose(-1, -2) * scale, dim=-1)
        if keep is not None:
            keep.append(attn)
        p = ste(attn, torch.clamp_max(torch.round(attn * mult), levels) / mult)
        return p @ ste(v, (v_c * s_v).transpose(-1, -2))
    acc = q_c.double() @ k_c.double().transpose(-1, -2)  # (B, H, N, N), exact integers below 2**24
    z = acc.float() * s_k.transpose(-1, -2)
    e = exp32((z - z.amax(-1, keepdim=True)) * (s_q * torch.tensor(scale, dtype=torch.float32)))
    inv = torch.tensor(1.0, dtype=torch.float32) / lane_sum(e)
    if keep is not None:
        keep.append(e * inv[..., None])
    p_c = torch.clamp_max(torch.round(e * inv[..., None] * torch.tensor(mult, dtype=torch.float32)), levels).double()
    acc = p_c @ v_c.double().transpose(-1, -2)  # (B, H, N, hd), exact
    return (acc * (s_v.double().transpose(-1, -2) / mult)).float()


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, backward the identity (straight-through estimator)."""
    return x + (q - x).detach()


class BitLinear(nn.Linear):
    """Ternary weights x int8 activations, trained with straight-through estimators.

    ``quantize=False`` makes it a plain float Linear (for float warm-up). ``weights`` sets
    what the weights are while ``quantize`` is on: ``"ternary"`` (the model), ``"int8"``
    (per-output-channel absmax int8: TerViT's first, 8-bit stage before ternary) or
    ``"float"`` (activations quantized, weights float: GPLQ's activation-first stage, after
    which the weights are ternarized post-training by ``convert``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: ViTConfig):
        super().__init__(in_features, out_features, bias=bias)
        self.granularity = cfg.scale_granularity
        self.norm = LayerNorm(in_features, eps=cfg.norm_eps) if cfg.bitlinear_norm else None
        self.quantize = True
        self.weights = "ternary"  # or "int8", "float": the training stages before ternary
        self.matmul_dtype = torch.float32  # of the training forward's product; see forward
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # (codes, gamma) from a weight file

    def freeze(self, codes: torch.Tensor, gamma: torch.Tensor) -> None:
        """Use exported codes and scales as they are (for comparing with the engine)."""
        self.frozen = (codes.float(), gamma.float().reshape(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if not self.quantize:
            return F.linear(x, self.weight, self.bias)
        x_q, s_x = quantize_activations(x)
        if self.weights != "ternary" and self.frozen is None:
            w = self.weight
            if self.weights == "int8":  # per output channel absmax, straight-through
                s_w = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(ACT_EPS) / ACT_QMAX
                w = ste(w, torch.clamp(torch.round(w / s_w), -ACT_QMAX, ACT_QMAX) * s_w)
            x = ste(x, x_q * s_x) if torch.is_grad_enabled() else x_q * s_x
            return F.linear(x, w, self.bias)
        w_q, gamma = self.frozen if self.frozen is not None else ternarize_weight(self.weight, self.granularity)
        if torch.is_grad_enabled():
            if self.matmul_dtype == torch.float32:
                return F.linear(ste(x, x_q * s_x), ste(self.weight, w_q * gamma), self.bias)
            # The same function and gradients, with the product taken over the codes: they are
            # small integers, exact in bfloat16, so the product's inputs are exact and only its
            # output (and the backward pass) is rounded to bfloat16's 8 bits. AMX (CPU) and
            # tensor cores run it 5-10x faster than float32; the scales stay float32.
            s_x, gamma = s_x.detach(), gamma.detach()
            u = ste(x / s_x, x_q)  # forward: the codes; backward: d/dx (x / s_x)
            v = ste(self.weight / (gamma + WEIGHT_EPS), w_q)
            dt = self.matmul_dtype
            y = F.linear(u.to(dt), v.to(dt)).float() * (s_x * gamma.reshape(-1))
            return y + self.bias if self.bias is not None else y
        # Inference: the engine's arithmetic, in its order. The integer sum is exact in float32
        # (|acc| <= 127 K < 2**24), then (acc * s_x) * gamma + bias: the same function as the
        # line above, and bit-identical to the engine's output for the same input codes.
        y = F.linear(x_q, w_q) * s_x * gamma.reshape(-1)
        return y + self.bias if self.bias is not None else y


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``; at inference (no gradients) computed in float64 and rounded once to
    float32, as the engine does (``kernels.rowops.layernorm_row``): two float64 computations of
    the same value round to the same float32 (except within ~1e-16 of a rounding tie), so
    the int8 codes of the next layer match the engine's. Float32 statistics in both would
    differ in the last bit and flip a code now and then (measured: a source of about a
    quarter of the images whose codes differ anywhere)."""

    exact = True  # False: float32 at inference too (a teacher in training needs no bit-exactness)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self.exact:
            return super().forward(x)
        xd = x.double()
        mean = xd.mean(-1, keepdim=True)
        var = ((xd - mean) ** 2).mean(-1, keepdim=True)
        rstd = 1.0 / torch.sqrt(var + self.eps)
        return ((xd - mean) * rstd * self.weight.double() + self.bias.double()).float()


class GELU(nn.GELU):
    """``nn.GELU()`` (erf form) for training; at inference (no gradients) the engine's GELU
    operation for operation (``kernels.rowops._gelu16``: Eigen's rational float32 erf, |error|
    <= 4.2e-7 against the exact erf), so both compute bit-identical float32 values. With
    PyTorch's own erf the last bits differ and the next int8 code flips at rounding ties:
    the largest single source of engine/PyTorch disagreements (measured 31 -> 19 of 10,000
    test images on the 86% model)."""

    exact = True  # False: torch's own GELU at inference too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or not self.exact:
            return super().forward(x)
        f32 = torch.float32

        def c(v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=f32, device=x.device)

        z = torch.clamp(x * c(1.0 / math.sqrt(2.0)), -4.0, 4.0)
        z2 = z * z
        p = torch.full_like(z, ERF_P[0])
        for k in ERF_P[1:]:
            p = p * z2 + c(k)
        q = torch.full_like(z, ERF_Q[0])
        for k in ERF_Q[1:]:
            q = q * z2 + c(k)
        return c(0.5) * x * (c(1.0) + z * p / q)


def make_linear(cfg: ViTConfig, layer: str, in_f: int, out_f: int, plain: bool = False) -> nn.Linear:
    if cfg.is_ternary(layer) and not plain:
        return BitLinear(in_f, out_f, cfg.has_bias(layer), cfg)
    return nn.Linear(in_f, out_f, bias=cfg.has_bias(layer))


class Attention(nn.Module):
    """timm's Attention; ``attention="int8"`` quantizes it (:func:`int8_attention`) while
    ``quantize`` is on, and ``qk_norm`` adds ``q_norm``/``k_norm`` (LayerNorm over hd)."""

    def __init__(self, cfg: ViTConfig, i: int, plain: bool = False):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = make_linear(cfg, f"blocks.{i}.attn.qkv", cfg.dim, 3 * cfg.dim, plain)
        norm = nn.LayerNorm if plain else LayerNorm
        self.q_norm = norm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = norm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.proj = make_linear(cfg, f"blocks.{i}.attn.proj", cfg.dim, cfg.dim, plain)
        self.int8 = cfg.attention == "int8" and not plain
        self.plain = plain
        self.qmax, self.levels = code_max(cfg.attention_bits), 2**cfg.attention_prob_bits - 1
        self.prob_clip = float(cfg.attention_prob_clip)
        self.quantize = True
        self.keep: list | None = None  # a list: each forward appends its attention map (distillation)
        self.exact = True  # False: float32 attention at inference too (a teacher in training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.int8 and self.quantize:
            o = int8_attention(q, k, v, self.qmax, self.levels, self.keep, self.prob_clip)
        elif self.keep is not None:  # the map itself is wanted: written out instead of the fused kernel
            attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            self.keep.append(attn)
            o = attn @ v
        elif torch.is_grad_enabled() or self.plain or not self.exact:
            o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v
        else:  # inference: in float64, rounded once to float32, as the engine does (kernels.attention._attention)
            o = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig, i: int, plain: bool = False):
        super().__init__()
        self.fc1 = make_linear(cfg, f"blocks.{i}.mlp.fc1", cfg.dim, cfg.hidden_dim, plain)
        self.act = nn.GELU() if plain else GELU()
        self.fc2 = make_linear(cfg, f"blocks.{i}.mlp.fc2", cfg.hidden_dim, cfg.dim, plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, i: int, drop_path: float = 0.0, plain: bool = False):
        super().__init__()
        norm = nn.LayerNorm if plain else LayerNorm
        self.norm1 = norm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, i, plain)
        self.norm2 = norm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg, i, plain)
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole residual branch per sample."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        x = x + self._drop(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig, plain: bool = False):
        super().__init__()
        self.p = cfg.patch_size
        self.proj = make_linear(cfg, "patch_embed.proj", cfg.patch_dim, cfg.dim, plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.p
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        return self.proj(x.reshape(B, (H // p) * (W // p), C * p * p))  # (B, N, D)


class QATViT(nn.Module):
    """The engine's ViT, trainable. ``state_dict`` names match the weight file's.

    ``plain=True`` builds the model a PyTorch user would write: every layer a float
    ``nn.Linear``, ``nn.LayerNorm``, ``nn.GELU``, float32 ``scaled_dot_product_attention``
    at inference too (the float32 baseline that
    ``bench`` and PyTorch's dynamic int8 quantization start from).
    """

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, plain: bool = False):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, plain)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim) * 0.02)
        rates = [drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, i, rates[i], plain) for i in range(cfg.depth))
        self.norm = (nn.LayerNorm if plain else LayerNorm)(cfg.dim, eps=cfg.norm_eps)
        self.head = make_linear(cfg, "head", cfg.dim, cfg.num_classes, plain)
        self.apply(self._init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_checkpoint(cls, ckpt) -> QATViT:
        """The PyTorch twin of a weight file (``weights.Checkpoint``): same codes, scales, floats."""
        cfg = ckpt.config
        model = cls(cfg)
        state = {}
        for name, p in model.state_dict().items():
            layer = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and f"{layer}.weight_packed" in ckpt.tensors:
                codes, gamma, _ = ckpt.ternary(layer)
                model.get_submodule(layer).freeze(torch.from_numpy(codes), torch.from_numpy(gamma))
                state[name] = p  # latent weight unused once frozen
            else:
                state[name] = torch.from_numpy(ckpt.tensors[name].reshape(p.shape).copy())
        model.load_state_dict(state)
        model.eval()
        return model

    @classmethod
    def float_twin(cls, ckpt) -> QATViT:
        """A plain float32 model of a weight file: ternary weights dequantized (codes x gamma)."""
        model = cls(ckpt.config, plain=True)
        state = {}
        for name, p in model.state_dict().items():
            layer = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and f"{layer}.weight_packed" in ckpt.tensors:
                state[name] = torch.from_numpy(ckpt.dequantized(layer))
            else:
                state[name] = torch.from_numpy(ckpt.tensors[name].reshape(p.shape).copy())
        model.load_state_dict(state)
        return model.eval()

    def _set(self, **attrs) -> None:
        for m in self.modules():
            if isinstance(m, BitLinear):
                for name, value in attrs.items():
                    setattr(m, name, value)

    def set_exact(self, on: bool) -> None:
        """Inference in the engine's exact arithmetic (float64 LayerNorm and attention, the
        engine's GELU; the default) or in plain float32 (2-3x faster: a teacher in training)."""
        for m in self.modules():
            if isinstance(m, (LayerNorm, GELU, Attention)):
                m.exact = on

    def keep_attention(self, on: bool) -> list[list]:
        """Collect every block's attention map from the next forwards (one list a block), or stop."""
        lists = []
        for m in self.modules():
            if isinstance(m, Attention):
                m.keep = [] if on else None
                lists.append(m.keep)
        return lists

    def set_quantize(self, on: bool) -> None:
        """Ternary layers and int8 attention on, or everything float (warm-up)."""
        self._set(quantize=on)
        for m in self.modules():
            if isinstance(m, Attention):
                m.quantize = on

    def set_weights(self, kind: str) -> None:
        """What the ternary layers' weights are in training: "ternary", "int8" or "float"."""
        self._set(weights=kind)

    def set_matmul_dtype(self, dtype: torch.dtype) -> None:
        """The dtype of the ternary layers' products in training (float32 or bfloat16);
        inference (no gradients) always computes the engine's exact sums in float32."""
        self._set(matmul_dtype=dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.numerics == "integer":
            return self.integer_forward(x)[0]
        return self.forward_head(self.forward_features(x))

    # -- integer numerics ----------------------------------------------------------------
    def _int_linear(self, module: nn.Module, layer: str):
        """A linear layer's integers (codes, g, e, B in Q16), as ``integer.IntegerParams``
        derives them from a weight file: ternary codes and gamma (this step's, or the frozen
        file's), or a float layer's int8 codes per output channel."""
        if isinstance(module, BitLinear):
            frozen = module.frozen
            w_q, gamma = frozen if frozen is not None else ternarize_weight(module.weight, module.granularity)
            scale = gamma.reshape(-1)
        else:
            wf = module.weight.detach().to(torch.float64)
            peak = wf.abs().amax(dim=1)
            w_q = torch.round(wf * (ACT_QMAX / torch.where(peak == 0, torch.ones_like(peak), peak))[:, None])
            scale = peak / ACT_QMAX
        g, e = im.dyadic(scale.detach())
        if torch.any(e < 0):
            raise TinyViTError(f"{layer}: a weight scale of 2**15 or more has no integer form here")
        B = None if module.bias is None else im.to_q16(module.bias.detach())
        return w_q.detach().to(torch.int64), g, e, B

    def _int_norm(self, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return im.to_q16(norm.weight.detach()), im.to_q16(norm.bias.detach())

    def integer_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``numerics="integer"``: (logits, Q16 int64 logits). The integers are
        ``integer.IntegerOracle``'s, bit for bit; with gradients on, every step's float value
        is the integer one and its gradient the float model's (straight-through), so the
        float parameters learn what the integers compute. Stochastic depth is not applied."""
        cfg, grad = self.cfg, torch.is_grad_enabled()
        eps = int(round(math.ldexp(cfg.norm_eps, 32)))

        def tie(f: torch.Tensor | None, i: torch.Tensor) -> torch.Tensor:
            v = i.to(torch.float32) / im.ONE
            return v if f is None else f + (v - f).detach()

        def lin(module, q, R, layer):
            return im.linear(q, R, *self._int_linear(module, layer))

        B_, C, H, W = x.shape
        p = cfg.patch_size
        patches = x.reshape(B_, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B_, -1, C * p * p)
        q, R = im.codes(im.to_q16(patches.to(torch.float32)), ACT_QMAX)
        xi = lin(self.patch_embed.proj, q, R, "patch_embed.proj")
        xf = tie(self.patch_embed.proj(patches) if grad else None, xi)
        cls, pos = im.to_q16(self.cls_token.detach()), im.to_q16(self.pos_embed.detach())
        xi = (torch.cat([cls.expand(B_, -1, -1), xi], dim=1) + pos).clamp(-im.SAT, im.SAT)
        if grad:
            xf = torch.cat([self.cls_token.expand(B_, -1, -1), xf], dim=1) + self.pos_embed
        xf = tie(xf if grad else None, xi)
        for i, blk in enumerate(self.blocks):
            site = f"blocks.{i}"
            # attention
            q, R = im.layer_norm_codes(xi, *self._int_norm(blk.norm1), eps)
            qkv_i = lin(blk.attn.qkv, q, R, f"{site}.attn.qkv")
            qkv_f = tie(blk.attn.qkv(blk.norm1(xf)) if grad else None, qkv_i)
            o_i, o_f = self._int_attention(blk.attn, qkv_i, qkv_f, grad)
            o_f = tie(o_f, o_i)
            q, R = im.codes(o_i, ACT_QMAX)
            pr_i = lin(blk.attn.proj, q, R, f"{site}.attn.proj")
            pr_f = tie(blk.attn.proj(o_f) if grad else None, pr_i)
            xi = (xi + pr_i).clamp(-im.SAT, im.SAT)
            xf = tie(xf + pr_f if grad else None, xi)
            # MLP
            q, R = im.layer_norm_codes(xi, *self._int_norm(blk.norm2), eps)
            h_i = lin(blk.mlp.fc1, q, R, f"{site}.mlp.fc1")
            h_f = tie(blk.mlp.fc1(blk.norm2(xf)) if grad else None, h_i)
            g_i = im.gelu(h_i)
            g_f = tie(blk.mlp.act(h_f) if grad else None, g_i)
            q, R = im.codes(g_i, ACT_QMAX)
            f2_i = lin(blk.mlp.fc2, q, R, f"{site}.mlp.fc2")
            f2_f = tie(blk.mlp.fc2(g_f) if grad else None, f2_i)
            xi = (xi + f2_i).clamp(-im.SAT, im.SAT)
            xf = tie(xf + f2_f if grad else None, xi)
        q, R = im.layer_norm_codes(xi[:, 0], *self._int_norm(self.norm), eps)
        logits_i = lin(self.head, q, R, "head")
        logits_f = tie(self.head(self.norm(xf)[:, 0]) if grad else None, logits_i)
        return logits_f, logits_i

    def _int_attention(self, attn: Attention, qkv_i: torch.Tensor, qkv_f: torch.Tensor, grad: bool):
        """``integer.IntegerOracle.attention``'s core on Q16 qkv (B, N, 3D): Q16 (B, N, D), and
        the float model's int8 attention of the float qkv (with gradients) or None."""
        cfg = self.cfg
        B_, N, D3 = qkv_i.shape
        H, hd = cfg.heads, cfg.head_dim
        qh, kh, vh = qkv_i.reshape(B_, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        qmax, L = attn.qmax, attn.levels
        j = round(-math.log2(cfg.attention_prob_clip))
        q_c, R_q = im.codes(qh, qmax)
        k_c, R_k = im.codes(kh, qmax)
        v_c, R_v = im.codes(vh.transpose(-1, -2), qmax)
        acc = im.int_matmul(q_c, k_c)
        R_qk = im.shift_round(R_q[..., :, None] * R_k[..., None, :], 16)
        t = im.round_div(acc * R_qk, qmax * qmax)
        scores = im.shift_round(t * round(im.ONE / math.sqrt(hd)), 16)
        p = im.softmax_codes(scores, cfg.attention_prob_bits, cfg.attention_prob_clip)
        acc = im.int_matmul(p, v_c)
        o_i = im.round_div(acc * R_v[..., None, :], L * qmax * (1 << j)).transpose(1, 2).reshape(B_, N, D3 // 3)
        if not grad:
            return o_i, None
        qf, kf, vf = qkv_f.reshape(B_, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o_f = int8_attention(qf, kf, vf, qmax, L, attn.keep, attn.prob_clip)
        return o_i, o_f.transpose(1, 2).reshape(B_, N, D3 // 3)


@torch.no_grad()
def torch_logits(model: QATViT, images_u8: np.ndarray, batch: int = 500) -> np.ndarray:
    """The model's logits for uint8 images [n, H, W, 3], as float32 NumPy."""
    out = []
    with torch.no_grad():  # inference: BitLinear then runs the engine's integer arithmetic
        for i in range(0, len(images_u8), batch):
            out.append(model(normalize(to_input(images_u8[i : i + batch]), model.cfg)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.num_classes), np.float32)


@torch.no_grad()
def evaluate(model: QATViT, data, idx: np.ndarray, device: str, batch: int = 500) -> dict[str, float]:
    """Loss and top-1 accuracy of ``model`` on the images ``idx`` of a ``data.Dataset``
    (the held-out split: the trainer's choice criterion)."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(idx), batch):
        b = idx[i : i + batch]
        x = normalize(to_input(data.images[b]), model.cfg).to(device)
        y = torch.from_numpy(data.labels[b]).to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return {"loss": loss / max(len(idx), 1), "acc": correct / max(len(idx), 1)}
