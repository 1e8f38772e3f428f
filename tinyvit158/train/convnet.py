"""The convolutional teacher's network (``train/teacher.py`` trains it; the ViT trainer
distils from it): a small, fast CIFAR-10 network in the line of Keller Jordan's airbench,
described in ``teacher.py``'s docstring, and how a ``teacher.pt`` becomes a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyvit158.errors import TinyViTError

KIND = "conv-teacher"  # the "kind" of a teacher.pt, so the ViT trainer can tell it from its own runs


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.norm1 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=momentum)
        for conv in (self.conv1, self.conv2):
            nn.init.dirac_(conv.weight.data[: conv.weight.shape[1]])  # an identity for the first channels
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class ConvTeacher(nn.Module):
    """The network of the module docstring. Takes images normalised with the student's
    mean and std (the trainer's batches), returns logits."""

    def __init__(self, widths: list[int], num_classes: int = 10, in_chans: int = 3, bn_momentum: float = 0.4):
        super().__init__()
        self.widths = list(widths)
        self.whiten = nn.Conv2d(in_chans, 2 * in_chans * 4, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        chans = [2 * in_chans * 4, *widths]
        self.groups = nn.Sequential(*(ConvGroup(a, b, bn_momentum) for a, b in zip(chans, chans[1:], strict=False)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening weights from the 2x2 patches of ``x`` (normalised images, N x C x H x W)."""
        c, (h, w) = x.shape[1], self.whiten.weight.shape[2:]
        patches = x.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w).double()
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        scaled = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, c, h, w)
        self.whiten.weight.data.copy_(torch.cat([scaled, -scaled]).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) / 9.0


def predict_tta(model: ConvTeacher, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Logits with test-time augmentation: (image + mirror)/2, averaged half and half with the
    same for the image shifted one pixel up-left and one down-right (reflect padding)."""

    def mirror(v):
        return 0.5 * (model(v).float() + model(v.flip(-1)).float())

    out = []
    for xb in x.split(batch):
        with autocast(xb.device):
            padded = F.pad(xb, (1, 1, 1, 1), mode="reflect")
            H, W = xb.shape[-2:]
            shifted = 0.5 * (mirror(padded[..., :H, :W]) + mirror(padded[..., 2 : H + 2, 2 : W + 2]))
            out.append(0.5 * mirror(xb) + 0.5 * shifted)
    return torch.cat(out)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def load_teacher_model(state: dict, path, device: str = "cpu") -> ConvTeacher:
    """The model of a ``teacher.pt`` state (eval mode, no gradients)."""
    if state.get("kind") != KIND:
        raise TinyViTError(f"{path}: not a teacher checkpoint (no kind {KIND!r})")
    try:
        model = ConvTeacher(state["widths"], state["num_classes"], state["in_chans"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise TinyViTError(f"{path}: not a teacher checkpoint ({str(e).splitlines()[0]})") from None
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    model.requires_grad_(False)
    return model
