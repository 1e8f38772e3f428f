"""Data augmentation on batched torch tensors (torchvision is not available here).

Images are float tensors ``(B, 3, H, W)`` in [0, 1]; every op draws its randomness from
the ``torch.Generator`` it is given, so an epoch's augmentations are reproducible.

- ``random_crop_flip``: pad 4 (reflect), crop back, flip half (the CIFAR classic);
- ``trivial_augment``: TrivialAugment (Muller & Hutter, 2021): one op per image, chosen
  uniformly, with a uniformly drawn strength. No tuned policy and, per its paper, as good
  as RandAugment/AutoAugment on CIFAR-10, which small ViTs need (Lee et al. 2021);
- ``mixup_cutmix``: timm-style, one of the two per batch, soft targets with label smoothing;
- ``random_erasing``: Zhong et al. 2020, a random rectangle replaced with noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _rand(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=g)


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    flip = _rand(g, B) < 0.5
    out = torch.empty_like(x)
    for i in range(B):
        crop = padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    return (b + factor * (a - b)).clamp(0, 1)


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).expand_as(img)


def _affine(img: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor([theta], dtype=img.dtype)
    grid = F.affine_grid(t, [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    lo = img.amin(dim=(1, 2), keepdim=True)
    hi = img.amax(dim=(1, 2), keepdim=True)
    return torch.where(hi > lo, (img - lo) / (hi - lo).clamp_min(1e-6), img)


def _equalize(img: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(img)
    for c in range(img.shape[0]):
        v = (img[c] * 255).round().long().flatten()
        hist = torch.bincount(v, minlength=256).float()
        cdf = hist.cumsum(0)
        lut = ((cdf - cdf[cdf > 0][0]) / max(float(cdf[-1] - cdf[cdf > 0][0]), 1.0)).clamp(0, 1)
        out[c] = lut[v].reshape(img.shape[1:])
    return out


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=img.dtype) / 13
    blurred = F.conv2d(F.pad(img[:, None], (1, 1, 1, 1), mode="replicate"), k[None, None])[:, 0]
    return _blend(img, blurred, factor)


def _op(img: torch.Tensor, op: int, m: float, sign: float) -> torch.Tensor:
    """Apply op number ``op`` at strength ``m`` in [0, 1] (``sign`` flips signed ops)."""
    H = img.shape[-1]
    enhance = 1.0 + sign * 0.9 * m  # 0.1 .. 1.9
    if op == 0:  # identity
        return img
    if op == 1:
        return _blend(img, torch.zeros_like(img), enhance)  # brightness
    if op == 2:
        return _blend(img, _gray(img).mean().expand_as(img), enhance)  # contrast
    if op == 3:
        return _blend(img, _gray(img), enhance)  # colour (saturation)
    if op == 4:
        return _sharpness(img, enhance)
    if op == 5:  # posterize to 4..8 bits
        bits = 8 - int(round(4 * m))
        step = 2 ** (8 - bits)
        return torch.floor(img * 255 / step) * step / 255
    if op == 6:  # solarize: invert above a threshold in (0, 1]
        return torch.where(img >= 1.0 - m, 1.0 - img, img)
    if op == 7:
        return _autocontrast(img)
    if op == 8:
        return _equalize(img)
    if op == 9:  # rotate up to 30 degrees
        a = math.radians(30 * m * sign)
        return _affine(img, [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]])
    if op == 10:  # shear x up to 0.3
        return _affine(img, [[1, 0.3 * m * sign, 0], [0, 1, 0]])
    if op == 11:
        return _affine(img, [[1, 0, 0], [0.3 * m * sign, 1, 0]])
    if op == 12:  # translate x up to 10 px (grid units: 2 / H per pixel)
        return _affine(img, [[1, 0, 2 * 10 * m * sign / H], [0, 1, 0]])
    if op == 13:
        return _affine(img, [[1, 0, 0], [0, 1, 2 * 10 * m * sign / H]])
    raise ValueError(op)


N_OPS = 14


def trivial_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    B = x.shape[0]
    ops = torch.randint(0, N_OPS, (B,), generator=g)
    mags = _rand(g, B)
    signs = torch.where(_rand(g, B) < 0.5, -1.0, 1.0)
    return torch.stack([_op(x[i], int(ops[i]), float(mags[i]), float(signs[i])) for i in range(B)])


def soft_targets(y: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / classes
    return torch.full((len(y), classes), off).scatter_(1, y[:, None], 1.0 - smoothing + off)


def mixup_cutmix(
    x: torch.Tensor, y: torch.Tensor, classes: int, g: torch.Generator, rng: np.random.Generator,
    smoothing: float = 0.1, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mix the batch with its reverse (as timm does); returns images and soft targets.

    ``rng`` draws the Beta(alpha, alpha) mixing weight (torch's Beta takes no generator).
    """
    t = soft_targets(y, classes, smoothing)
    if prob <= 0 or _rand(g, 1).item() >= prob:
        return x, t
    use_cutmix = _rand(g, 1).item() < 0.5
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    x2, t2 = x.flip(0), t.flip(0)
    if use_cutmix:
        _, _, H, W = x.shape
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x2[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1.0 - lam) * x2
    return x, lam * t + (1.0 - lam) * t2


def random_erasing(x: torch.Tensor, g: torch.Generator, p: float = 0.25) -> torch.Tensor:
    """Replace a random rectangle (2-33% of the area, aspect 0.3-3.3) with N(0, 1) noise (normalized space)."""
    B, C, H, W = x.shape
    x = x.clone()
    for i in range(B):
        if _rand(g, 1).item() >= p:
            continue
        for _ in range(10):
            area = H * W * (0.02 + 0.31 * _rand(g, 1).item())
            aspect = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * _rand(g, 1).item())
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < H and 0 < w < W:
                top = int(torch.randint(0, H - h + 1, (1,), generator=g))
                left = int(torch.randint(0, W - w + 1, (1,), generator=g))
                x[i, :, top : top + h, left : left + w] = torch.randn(C, h, w, generator=g)
                break
    return x
