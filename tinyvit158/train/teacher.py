"""A convolutional teacher for distillation: ``python -m tinyvit158.train.teacher --data DIR --out RUN``.

ViTs lack a convolution's inductive bias on small data; DeiT (Touvron et al. 2021) showed
that a convolutional teacher closes much of that gap. This is a small, fast CIFAR-10
network in the line of Keller Jordan's airbench ("94% on CIFAR-10 in 3.29 seconds on a
single GPU", 2024), itself grown from hlb-CIFAR10 and Page's "How to train your ResNet":

- network: a 2x2 convolution initialised to whiten the input patches (its weights fixed,
  the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), with their
  negatives), then three groups of conv 3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv
  3x3 -> BatchNorm -> GELU (widths 64, 256, 256 by default: 1.97 M parameters), a global
  max-pool and a linear head scaled by 1/9. Convolutions start as identities (Dirac
  initialisation); BatchNorm scales are fixed at 1, only their biases learn;
- optimisation: Nesterov SGD at batch 1024 with decoupled hyperparameters (learning rate
  and weight decay per 1024 images), BatchNorm biases at 64x the rate, a triangular rate
  schedule, label smoothing 0.2, the whitening bias trained for the first 3 epochs only,
  and "lookahead": from epoch 3 an exponential average of the weights, copied back into
  the network every 5 steps, its decay rising over training;
- data: random translation by up to 2 pixels (reflect padding) and an alternating flip
  (each image is flipped at random once, then every image is flipped on odd epochs);
- evaluation with test-time augmentation: the mean of the logits of the image, its
  mirror, and both shifted one pixel up-left and down-right (6 views, weighted as
  airbench does).

It trains on the same 45,000 images as the ViT (the 5,000 held-out images, fixed by
``split_seed``, the student's ``--seed``, are never trained on, so the student's choices
on them stay honest; members of an ensemble differ in ``seed``) and reports held-out
accuracy each epoch and test accuracy at the end when the test split is found next to the
training data. Resumable like the ViT trainer: ``RUN/last.pt`` is replaced atomically
after every epoch, and epoch e's shuffling and augmentation come from a generator seeded
with (seed, e), so a resumed run repeats the same draws. The taught model is
``RUN/teacher.pt`` (plain values and tensors only: it loads with ``weights_only=True``);
pass it to the ViT trainer as ``--teacher RUN/teacher.pt`` (several, comma-separated: an
ensemble).

On a GPU the convolutions run in bfloat16 (autocast); on a CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tinyvit158.cli import prog
from tinyvit158.config import get_preset
from tinyvit158.data import DataError, data_arg, load_cifar10, split_holdout
from tinyvit158.errors import TinyViTError
from tinyvit158.files import check_output_folder
from tinyvit158.train.convnet import KIND, ConvTeacher, autocast, load_teacher_model, predict_tta
from tinyvit158.train.state import load_checkpoint, save_checkpoint


@dataclass
class TeacherRecipe:
    """Everything that defines a teacher run; stored in its checkpoints and checked on resume."""

    preset: str = "cifar10-tiny"  # the student's preset: its image size, classes, mean and std
    widths: list[int] = field(default_factory=lambda: [64, 256, 256])
    epochs: int = 10
    batch: int = 1024
    lr: float = 11.5  # per 1024 images, decoupled from the momentum
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 images, decoupled from the learning rate
    bias_scaler: float = 64.0  # BatchNorm biases learn this much faster
    smoothing: float = 0.2
    translate: int = 2
    ema_start: int = 3  # lookahead from this epoch
    ema_every: int = 5  # steps between lookahead updates
    ema_decay: float = 0.95
    ema_pow: float = 3.0
    whiten_bias_epochs: int = 3
    holdout: int = 5000
    limit_train: int = 0  # use only this many training images (smoke tests); 0: all
    seed: int = 0  # initialisation, order and augmentations (members of an ensemble differ here)
    split_seed: int = 0  # the held-out split: the student's --seed


def to_tensor(images: np.ndarray, mean, std, device: str) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W) on ``device``."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def translate(x: torch.Tensor, r: int, g: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ``r`` pixels each way (reflect padding)."""
    if r == 0:
        return x
    H, W = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r), mode="reflect")
    shifts = torch.randint(0, 2 * r + 1, (len(x), 2), generator=g).to(x.device)
    out = torch.empty_like(x)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[m] = padded[m, :, dy : dy + H, dx : dx + W]
    return out


def triangle(step: int, total: int, start: float = 0.2, peak: float = 0.23, end: float = 0.07) -> float:
    """airbench's schedule: linear from ``start`` to 1 at ``peak`` of the run, then to ``end``."""
    top = int(peak * total)
    if step < top:
        return start + (1 - start) * step / max(top, 1)
    return 1 + (end - 1) * (step - top) / max(total - top, 1)


def accuracy(model: ConvTeacher, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (predict_tta(model, x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_teacher(
    r: TeacherRecipe, data_path: str, out: Path, device: str = "cpu", progress: bool = True, max_minutes: float = 0.0
) -> dict:
    """Run (or resume) a teacher recipe; returns the teacher's record (accuracies, times).
    ``max_minutes``: stop after the epoch that passes it (rerun to resume); the record is
    then ``{"stopped_after": epoch}`` and no ``teacher.pt`` is written yet."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(r.preset)
    dev = torch.device(device)
    torch.manual_seed(r.seed)
    model = ConvTeacher(r.widths, cfg.num_classes, cfg.in_chans).to(dev).to(memory_format=torch.channels_last)
    data = load_cifar10(data_path, "train", progress=progress)
    train_idx, val_idx = split_holdout(data.labels, r.holdout, r.split_seed)
    if r.limit_train:
        train_idx, val_idx = train_idx[: r.limit_train], val_idx[: max(r.limit_train // 4, 10)]
    x_train = to_tensor(data.images[train_idx], cfg.mean, cfg.std, device)
    y_train = torch.from_numpy(data.labels[train_idx]).to(dev)
    x_val = to_tensor(data.images[val_idx], cfg.mean, cfg.std, device)
    y_val = torch.from_numpy(data.labels[val_idx]).to(dev)

    kilostep = 1024 * (1 + 1 / (1 - r.momentum))  # decoupled -> PyTorch's SGD (airbench's parametrisation)
    lr, wd = r.lr / kilostep, r.weight_decay * r.batch / kilostep
    norm_biases = [p for n, p in model.named_parameters() if "norm" in n and p.requires_grad]
    others = [p for n, p in model.named_parameters() if "norm" not in n and p.requires_grad]
    lr_b = lr * r.bias_scaler
    opt = torch.optim.SGD(
        [{"params": norm_biases, "lr": lr_b, "weight_decay": wd / lr_b},
         {"params": others, "lr": lr, "weight_decay": wd / lr}],
        momentum=r.momentum, nesterov=True,
    )  # fmt: skip
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = len(train_idx) // r.batch
    total = steps_per_epoch * r.epochs
    ema: dict[str, torch.Tensor] | None = None
    start_epoch, wall, log = 0, 0.0, []
    last = out / "last.pt"
    if last.exists():
        state = load_checkpoint(last, device)
        if state.get("recipe") != asdict(r):
            raise TinyViTError(f"{last} was trained with a different recipe; use another --out or the same options")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema = state["ema"] or None
        start_epoch, wall, log = state["epoch"], state["wall_s"], state["log"]
        print(f"resuming {last} after epoch {start_epoch}", file=sys.stderr)
    else:
        model.init_whitening(x_train[:5000].float())
    base_flip = torch.rand(len(x_train), generator=torch.Generator().manual_seed(r.seed)).to(dev) < 0.5
    t_start = time.time()
    for epoch in range(start_epoch, r.epochs):
        if max_minutes and epoch > start_epoch and (time.time() - t_start) / 60 >= max_minutes:
            print(f"stopping after {max_minutes} minutes; rerun the same command to resume", file=sys.stderr)
            return {"stopped_after": epoch}
        t0 = time.time()
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([r.seed, epoch]).generate_state(1)[0]))
        model.whiten.bias.requires_grad_(epoch < r.whiten_bias_epochs)
        flip = base_flip ^ bool(epoch % 2)  # alternating flip: each image's random flip, then all flipped on odd epochs
        x = torch.where(flip.view(-1, 1, 1, 1), x_train.flip(-1), x_train)
        x = translate(x, r.translate, g)
        order = torch.randperm(len(x), generator=g).to(dev)
        steps = range(steps_per_epoch)
        if progress:
            steps = tqdm(steps, desc=f"epoch {epoch + 1}/{r.epochs}", unit="step", mininterval=5, leave=False)
        model.train()
        loss_sum = torch.zeros((), device=dev)
        for s in steps:
            step = epoch * steps_per_epoch + s
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * triangle(step, total)
            idx = order[s * r.batch : (s + 1) * r.batch]
            with autocast(dev):
                logits = model(x[idx])
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=r.smoothing, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            if epoch >= r.ema_start and (step + 1) % r.ema_every == 0:
                if ema is None:
                    ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
                else:
                    rho = r.ema_decay**r.ema_every * ((step + 1) / total) ** r.ema_pow
                    lookahead(model, ema, rho)
        if ema is not None:
            lookahead(model, ema, 1.0)  # the network becomes the average at the end of each epoch
        val = accuracy(model, x_val, y_val)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall += time.time() - t0
        log.append({"epoch": epoch + 1, "train_loss": loss_sum.item() / (steps_per_epoch * r.batch), "val_acc": val,
                    "wall_s": wall})  # fmt: skip
        save_checkpoint(
            {"recipe": asdict(r), "model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema or {},
             "epoch": epoch + 1, "wall_s": wall, "log": log},
            last,
        )  # fmt: skip
        print(
            f"epoch {epoch + 1}/{r.epochs}: loss {log[-1]['train_loss']:.3f} held-out acc (TTA) {val:.4f}"
            f" {wall:.1f} s",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    record = {"val_acc": log[-1]["val_acc"] if log else None, "wall_s": wall, "epochs": r.epochs}
    try:
        test = load_cifar10(data_path, "test", progress=False)
        x_test = to_tensor(test.images, cfg.mean, cfg.std, device)
        record["test_acc"] = accuracy(model, x_test, torch.from_numpy(test.labels).to(dev))
        print(f"test acc (TTA) {record['test_acc']:.4f}", file=sys.stderr)
    except DataError as e:
        print(f"test split not found, test accuracy not measured ({e})", file=sys.stderr)
    state = {
        "kind": KIND, "widths": r.widths, "num_classes": cfg.num_classes, "in_chans": cfg.in_chans,
        "image_size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std), "model": model.state_dict(),
        "recipe": asdict(r), "log": log, **record, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)", "torch": str(torch.__version__),
    }  # fmt: skip
    save_checkpoint(state, out / "teacher.pt")
    with open(out / "teacher.json", "w") as f:
        json.dump({k: v for k, v in state.items() if k != "model"}, f, indent=1)
    return record


def evaluate_teacher(path: str, data_path: str, device: str = "cpu") -> dict:
    """Test accuracy of a ``teacher.pt``, with and without test-time augmentation."""
    state = load_checkpoint(path, device)
    model = load_teacher_model(state, path, device)
    test = load_cifar10(data_path, "test", progress=False)
    x = to_tensor(test.images, state["mean"], state["std"], device)
    y = torch.from_numpy(test.labels).to(device)
    with torch.no_grad():
        plain = torch.cat([model(xb).float() for xb in x.split(1000)])
        tta = predict_tta(model, x)
    return {
        "test_acc": (plain.argmax(1) == y).float().mean().item(),
        "test_acc_tta": (tta.argmax(1) == y).float().mean().item(),
    }


@torch.no_grad()
def lookahead(model: nn.Module, ema: dict[str, torch.Tensor], decay: float) -> None:
    """Move the average towards the weights by ``1 - decay``, then copy it back into the network."""
    for k, v in model.state_dict().items():
        if k in ema:
            ema[k].lerp_(v, 1 - decay)
            v.copy_(ema[k])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("tinyvit158.train.teacher"),
        description="Train a convolutional teacher on CIFAR-10 (airbench-style); rerun the same command to resume.",
    )
    p.add_argument(
        "--data", help="CIFAR-10: folder with the zips, a zip, or the python tarball (default: TINYVIT158_DATA)"
    )
    p.add_argument("--out", type=Path, help="run folder: last.pt (to resume), teacher.pt, teacher.json")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after the epoch that passes this (0: never)")
    defaults = TeacherRecipe()
    p.add_argument("--preset", default=defaults.preset, help="the student's preset (inputs, classes, mean, std)")
    p.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], default=defaults.widths,
                   help="channels of the three conv groups (default: 64,256,256)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs (default: 10)")
    p.add_argument("--batch", type=int, default=defaults.batch, help="images a step (default: 1024)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="learning rate per 1024 images (default: 11.5)")
    p.add_argument("--limit-train", type=int, default=0, help="use only this many training images (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, order and augmentations")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split: the student's --seed")
    p.add_argument("--evaluate", metavar="TEACHER", help="measure a teacher.pt's test accuracy instead of training")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = data_arg(p, args.data)
    if args.out is None and not args.evaluate:
        p.error("--out is required (the run folder), unless --evaluate")
    recipe = TeacherRecipe(preset=args.preset, widths=args.widths, epochs=args.epochs, batch=args.batch, lr=args.lr,
                           limit_train=args.limit_train, seed=args.seed, split_seed=args.split_seed)  # fmt: skip
    try:
        if args.evaluate:
            print(json.dumps(evaluate_teacher(args.evaluate, data, args.device)))
            return 0
        if len(recipe.widths) < 1 or min(recipe.widths) < 1:
            raise TinyViTError(f"--widths {args.widths}: give positive channel counts, e.g. 64,256,256")
        check_output_folder(args.out)
        train_teacher(recipe, data, args.out, args.device, progress=not args.no_progress, max_minutes=args.max_minutes)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
