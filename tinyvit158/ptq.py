"""Post-training ternarization of a float ViT (timm's ``VisionTransformer`` names), with an
optional closed-form compensation (``convert --compensate``).

A float state dict -> a tinyvit158 checkpoint:

1. the config from the shapes: width from ``cls_token``, patch size and channels from the
   ``patch_embed.proj`` conv, tokens (so the image size) from ``pos_embed``, depth from the
   blocks, MLP width from ``fc1``, classes from ``head``, the qkv bias from its presence.
   What shapes cannot tell (heads, LayerNorm eps, mean/std, class names) comes from a
   preset and ``--set``;
2. every ternary layer's codes and scales (:func:`ternary_codes`), by the first route that
   applies: ViT-1.58b's ``quant_weight`` and ``weight_scale`` buffers (the codes and
   gamma = 1 / weight_scale); a weight that is already ternary, at most the three values
   {-a, 0, +a} per row or per tensor (its codes and a, exactly); else ``quant.ternarize``
   (absmean, per tensor or per output channel) with gamma = mean |W| (``--scale absmean``)
   or the least-squares scale of those codes, mean |W| over the non-zero codes (``--scale
   lsq``; Ternary Weight Networks, Li et al. 2016). Everything else is copied as float32.

ViT-1.58b's BitLinear (DLYuanGod/ViT-1.58b) holds a LayerNorm on its input:
``<layer>.norm.weight`` and ``.bias`` set ``bitlinear_norm``, and the layers that have them
(the blocks' four; the patch embedding and head when theirs are BitLinear too) are the
ternary ones. Biases are kept, as the model trained with them; ViT-1.58b's own inference
path drops them.

Compensation (after "Quantization without Tears", QwT: a closed-form correction of each
quantized layer against the float one). For each ternary layer in forward order, the
calibration images are run through the ternary model so far; with X its inputs there,
y_t the ternary layer's output and y_f = X W_f^T + b_f the float layer's output on the
same X, each output channel n gets the least-squares line

    min over a_n, c_n of  sum_t (a_n y_t[t, n] + c_n - y_f[t, n])^2
    a_n = cov(y_t, y_f) / var(y_t),   c_n = mean(y_f) - a_n mean(y_t)

and it is folded into the layer: since y_t = acc * s_x * gamma_n + b_n, a_n y_t + c_n is
acc * s_x * (a_n gamma_n) + (a_n b_n + c_n): the same codes with gamma' = a_n gamma_n and
bias' = a_n b_n + c_n (a negative a_n negates the channel's codes instead, as gamma >= 0).
So the file format and the engine do not change, and the fold is exact (per-channel
scales: compensation needs ``scale_granularity="channel"``). The next layer's inputs are
then taken from the compensated model, so each layer corrects what the ones before it left.
"""

from __future__ import annotations

import math
import re

import numpy as np

from tinyvit158.config import BLOCK_LINEARS, BLOCK_NORMS, ViTConfig
from tinyvit158.errors import TinyViTError
from tinyvit158.oracle import Oracle
from tinyvit158.packing import pack
from tinyvit158.quant import quantize_activations, ternarize
from tinyvit158.weights import Checkpoint, tensor_spec

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
# a BitLinear layer's tensors beside weight and bias: its own LayerNorm, and the codes and
# scale ViT-1.58b's forward caches as buffers
_BITLINEAR = ("norm.weight", "norm.bias", "quant_weight", "weight_scale")
_BLOCK_TENSORS = {f"{site}.{p}" for site in BLOCK_LINEARS + BLOCK_NORMS for p in ("weight", "bias")}
_BLOCK_TENSORS |= {f"{site}.{p}" for site in BLOCK_LINEARS for p in _BITLINEAR}
_TOP = {"cls_token", "pos_embed", "norm.weight", "norm.bias"}
_TOP |= {f"{layer}.{p}" for layer in ("patch_embed.proj", "head") for p in ("weight", "bias", *_BITLINEAR)}
SCALES = ("absmean", "lsq")
_REFUSED = {
    "dist_token": "a distillation token (DeiT's distilled models): convert the plain DeiT",
    "head_dist": "a distillation head (DeiT's distilled models): convert the plain DeiT",
    "reg_token": "register tokens: not in this architecture",
    "fc_norm": "a norm before the head on pooled tokens (global pooling): not in this architecture",
    "norm_pre": "a norm before the blocks: not in this architecture",
    "ls1": "LayerScale: not in this architecture",
    "ls2": "LayerScale: not in this architecture",
    "q_norm": "q/k norms: tinyvit158 has them with int8 attention only (train with --set qk_norm=true)",
    "k_norm": "q/k norms: tinyvit158 has them with int8 attention only (train with --set qk_norm=true)",
}


def check_state_dict(sd: dict[str, np.ndarray]) -> None:
    """One-line refusals naming the tensor: names this architecture lacks, non-float or
    non-finite values."""
    for name, t in sd.items():
        for part, why in _REFUSED.items():
            if part in name.split("."):
                raise TinyViTError(f"tensor {name!r}: {why}")
        m = _BLOCK.fullmatch(name)
        if (m is None and name not in _TOP) or (m is not None and m.group(2) not in _BLOCK_TENSORS):
            raise TinyViTError(f"tensor {name!r}: unknown name (expected timm VisionTransformer names)")
        if not np.issubdtype(t.dtype, np.floating):
            raise TinyViTError(f"tensor {name!r}: dtype {t.dtype}, a float weight expected")
        if not np.all(np.isfinite(t)):
            raise TinyViTError(f"tensor {name!r}: holds NaN or infinite values")


def config_from_shapes(sd: dict[str, np.ndarray], base: ViTConfig, heads: int | None) -> ViTConfig:
    """The config the tensors' shapes say, the heads given (None: refused), the rest from
    ``base`` (a preset with --set)."""
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight", "blocks.0.mlp.fc1.weight"):
        if name not in sd:
            raise TinyViTError(f"tensor {name!r}: missing")
    dim = sd["cls_token"].shape[-1]
    pe = sd["patch_embed.proj.weight"]
    if pe.ndim != 4 or pe.shape[2] != pe.shape[3] or pe.shape[0] != dim:
        raise TinyViTError(f"tensor 'patch_embed.proj.weight': shape {pe.shape}, expected ({dim}, C, p, p)")
    patches = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise TinyViTError(f"tensor 'pos_embed': {patches + 1} tokens is not a square grid plus the class token")
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.fullmatch, sd) if m)
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    classes = sd["head.weight"].shape[0]
    if heads is None:
        raise TinyViTError("the heads cannot be read from the shapes: give --preset (e.g. deit-tiny) or --set heads=N")
    names = base.class_names if len(base.class_names) == classes else tuple(f"class_{i}" for i in range(classes))
    bitlinear = {name[: -len(".norm.weight")] for name in sd if name.endswith(".norm.weight")}
    if bitlinear:  # ViT-1.58b: the BitLinear layers are the ternary ones; the blocks' are all BitLinear
        for i in range(depth):
            for site in BLOCK_LINEARS:
                if f"blocks.{i}.{site}" not in bitlinear:
                    raise TinyViTError(f"tensor 'blocks.{i}.{site}.norm.weight': missing (a BitLinear model has a "
                                       "norm on every block linear)")  # fmt: skip
        base = base.replace(bitlinear_norm=True, ternary_patch_embed="patch_embed.proj" in bitlinear,
                            ternary_head="head" in bitlinear)  # fmt: skip
    return base.replace(
        image_size=grid * pe.shape[2], patch_size=pe.shape[2], in_chans=pe.shape[1], dim=dim, depth=depth, heads=heads,
        mlp_ratio=hidden / dim, num_classes=classes, class_names=names, qkv_bias="blocks.0.attn.qkv.bias" in sd,
    )  # fmt: skip


def float_weights(sd: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each linear layer's float (out, in) weight and bias, shapes checked against ``cfg``."""
    out = {}
    for layer, (n, k) in cfg.linear_shapes().items():
        if f"{layer}.weight" not in sd:
            raise TinyViTError(f"tensor '{layer}.weight': missing")
        w = sd[f"{layer}.weight"].reshape(sd[f"{layer}.weight"].shape[0], -1)
        if w.shape != (n, k):
            raise TinyViTError(f"tensor '{layer}.weight': shape {sd[f'{layer}.weight'].shape}, expected ({n}, {k})")
        bias = sd.get(f"{layer}.bias")
        if cfg.has_bias(layer) and (bias is None or bias.shape != (n,)):
            raise TinyViTError(f"tensor '{layer}.bias': {'missing' if bias is None else f'shape {bias.shape}'}")
        out[layer] = (w.astype(np.float64), None if bias is None else bias.astype(np.float64))
    return out


def exact_ternary(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The codes and per-row scale a of a weight whose rows each hold at most {-a, 0, +a}
    (a per tensor when the rows agree), exactly; None for any other weight."""
    a = np.abs(w)
    top = a.max(axis=1, keepdims=True)
    if not np.all((a == 0) | (a == top)):
        return None
    scale = top[:, 0]
    if np.any(scale == 0) and np.any(scale > 0):  # an all-zero row: any scale; the others' smallest
        scale = np.where(scale == 0, scale[scale > 0].min(), scale)
    return np.sign(w).astype(np.int8), scale.astype(np.float32)


def lsq_scale(w: np.ndarray, codes: np.ndarray, granularity: str) -> np.ndarray:
    """The least-squares scale of fixed ternary codes: mean |W| over the non-zero codes (per
    row or per tensor), argmin_a ||W - a codes||^2; 0 for a group with no non-zero code."""
    nz = codes != 0
    a, axis = np.abs(np.asarray(w, np.float64)) * nz, 1 if granularity == "channel" else None
    count = nz.sum(axis=axis)
    alpha = np.where(count > 0, a.sum(axis=axis) / np.maximum(count, 1), 0.0)
    return np.broadcast_to(alpha, (w.shape[0],)).astype(np.float32)


def ternary_codes(sd: dict[str, np.ndarray], layer: str, w: np.ndarray, granularity: str,
                  scale: str = "absmean", exact: bool = True) -> tuple[np.ndarray, np.ndarray, str]:  # fmt: skip
    """``layer``'s codes (N, K) int8, gamma (N,) float32 and the route that gave them (the
    module docstring's order: ``buffers``, ``ternary``, ``absmean`` or ``lsq``). Without
    ``exact``, latent weights trained with absmean in the loop (a trainer checkpoint) take
    absmean even where they happen to be ternary (a run just started from a weight file)."""
    q, s = sd.get(f"{layer}.quant_weight"), sd.get(f"{layer}.weight_scale")
    n = w.shape[0]
    if (q is None) != (s is None):
        have, lack = ("quant_weight", "weight_scale") if s is None else ("weight_scale", "quant_weight")
        raise TinyViTError(f"tensor '{layer}.{have}': without '{layer}.{lack}' (ViT-1.58b stores both)")
    if q is not None:
        if q.size != w.size or not np.all(np.isin(q, (-1.0, 0.0, 1.0))):
            raise TinyViTError(f"tensor '{layer}.quant_weight': expected {w.shape} codes in -1, 0, 1")
        s = np.asarray(s, np.float64).reshape(-1)
        if s.size not in (1, n) or not np.all(s > 0):
            raise TinyViTError(f"tensor '{layer}.weight_scale': expected one positive scale (or {n}), found {s}")
        if granularity == "tensor" and np.ptp(s) > 0:
            raise TinyViTError(f"tensor '{layer}.weight_scale': one scale per row; convert with --granularity channel")
        gamma = np.broadcast_to(1.0 / s, (n,)).astype(np.float32)
        return q.reshape(w.shape).astype(np.int8), gamma, "buffers"
    found = exact_ternary(w) if exact else None
    if found is not None:
        if granularity == "tensor" and np.ptp(found[1]) > 0:
            raise TinyViTError(f"tensor '{layer}.weight': already ternary with one scale per row; "
                               "convert with --granularity channel")  # fmt: skip
        return (*found, "ternary")
    if scale not in SCALES:
        raise TinyViTError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    codes, gamma = ternarize(w, granularity)
    return codes, (lsq_scale(w, codes, granularity) if scale == "lsq" else gamma), scale


def ternarize_state(sd: dict[str, np.ndarray], cfg: ViTConfig, source: dict, scale: str = "absmean",
                    exact: bool = True) -> tuple[Checkpoint, dict[str, int]]:  # fmt: skip
    """The checkpoint of a float state dict: ternary layers' codes (:func:`ternary_codes`)
    packed, the rest float32, and the number of layers each route gave."""
    layers = float_weights(sd, cfg)
    tensors: dict[str, np.ndarray] = {}
    routes: dict[str, int] = {}
    for name, (_, shape) in tensor_spec(cfg).items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight_packed"):
            codes, gamma, route = ternary_codes(sd, layer, layers[layer][0], cfg.scale_granularity, scale, exact)
            routes[route] = routes.get(route, 0) + 1
            tensors[name] = pack(codes, cfg.packing)
            tensors[f"{layer}.weight_scale"] = gamma
        elif name.endswith(".weight_scale"):
            continue
        else:
            if name not in sd:
                raise TinyViTError(f"tensor {name!r}: missing")
            if int(np.prod(sd[name].shape)) != int(np.prod(shape)):
                raise TinyViTError(f"tensor {name!r}: shape {sd[name].shape}, expected {shape}")
            tensors[name] = sd[name].reshape(shape).astype(np.float32)
    tensors = {name: tensors[name] for name in tensor_spec(cfg)}
    return Checkpoint(cfg, tensors, source), routes


def compensate(ckpt: Checkpoint, sd: dict[str, np.ndarray], images: np.ndarray) -> tuple[Checkpoint, dict]:
    """The module docstring's per-channel correction of every ternary layer, on ``images``
    (normalized float32 (B, C, H, W)). Returns the new checkpoint and, per layer, the
    mean squared error against the float layer before and after."""
    cfg = ckpt.config
    if cfg.scale_granularity != "channel":
        raise TinyViTError("--compensate folds a scale per output channel: use --granularity channel")
    floats = float_weights(sd, cfg)
    tensors = dict(ckpt.tensors)
    report = {}
    for layer in cfg.linear_shapes():
        if not cfg.is_ternary(layer):
            continue
        current = Checkpoint(cfg, tensors, ckpt.source)
        x = layer_inputs(current, images, layer)  # (rows, in) as the ternary model sees them
        y_t = Oracle(current).linear(x, layer)
        w_f, b_f = floats[layer]
        y_f = x @ w_f.T + (0.0 if b_f is None else b_f)
        a, c = fit_lines(y_t, y_f)
        if not cfg.has_bias(layer):
            a, c = fit_lines(y_t, y_f, offset=False)
        gamma = tensors[f"{layer}.weight_scale"].astype(np.float64)
        flip = a < 0  # a channel the fit turns around: its codes negated, so gamma stays >= 0 (exact)
        if flip.any():
            codes = current.ternary(layer)[0]
            codes[flip] = -codes[flip]
            tensors[f"{layer}.weight_packed"] = pack(codes, cfg.packing)
        tensors[f"{layer}.weight_scale"] = (np.abs(a) * gamma).astype(np.float32)
        if cfg.has_bias(layer):
            tensors[f"{layer}.bias"] = (a * tensors[f"{layer}.bias"].astype(np.float64) + c).astype(np.float32)
        report[layer] = (float(np.mean((y_t - y_f) ** 2)), float(np.mean((a * y_t + c - y_f) ** 2)))
    return Checkpoint(cfg, tensors, ckpt.source), report


def fit_lines(y_t: np.ndarray, y_f: np.ndarray, offset: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per column n, the least-squares ``a_n y_t + c_n ~ y_f`` (``c_n = 0`` without ``offset``);
    a column whose y_t is constant keeps a = 1."""
    if offset:
        mt, mf = y_t.mean(0), y_f.mean(0)
        var = ((y_t - mt) ** 2).mean(0)
        cov = ((y_t - mt) * (y_f - mf)).mean(0)
        a = np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 1.0)
        return a, mf - a * mt
    ss = (y_t**2).mean(0)
    a = np.where(ss > 1e-12, (y_t * y_f).mean(0) / np.maximum(ss, 1e-12), 1.0)
    return a, np.zeros_like(a)


def layer_inputs(ckpt: Checkpoint, images: np.ndarray, layer: str) -> np.ndarray:
    """The float rows a ternary layer quantizes, when the oracle of ``ckpt`` runs ``images``."""
    seen = {}

    def recorder(x, site, qmax=127):
        if site == layer:
            seen[site] = x.reshape(-1, x.shape[-1]).copy()
            raise _Seen  # the rest of the forward pass is not needed
        return quantize_activations(x, qmax)

    try:
        Oracle(ckpt, quantizer=recorder)(images)
    except _Seen:
        pass
    return seen[layer]


class _Seen(Exception):  # noqa: N818 (control flow, never seen by a user)
    pass
