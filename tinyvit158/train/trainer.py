"""The trainer: ``python -m tinyvit158.train --data PATH --preset cifar10-tiny --epochs N --out DIR``.

Resumable by construction: after every epoch ``DIR/last.pt`` is replaced atomically
(temporary file + rename) with the model, optimizer and epoch; rerunning the same command
continues from there. The augmentations of batch s of epoch e come from generators seeded
with (seed, e, s) and the model's own draws (drop path) from torch's generator seeded with
(seed, e), so a run killed at any moment and resumed ends with the same weights as an
uninterrupted one, given the same torch version and thread count (CPU kernels are
deterministic for a fixed thread count; a GPU's atomics are not). ``--workers N``
augments batches in N processes (the result does not depend on N): on a GPU the
per-image augmentation would otherwise starve it.

Hyperparameters are chosen on 5,000 images held out of the training split (500 per
class, fixed by the seed); the test split is never read here.

Knowledge distillation: ``--teacher T --distill A [--distill-temp T | --distill-hard true]``
trains on ``(1 - A)`` x the usual loss plus ``A`` x the teacher's term: its soft targets,
or with ``--distill-hard`` the cross-entropy with its argmax (DeiT's hard variant). The
teacher sees the same augmented batch. It may be a convolutional teacher
(``python -m tinyvit158.train.teacher``, ``RUN/teacher.pt``) or any trained run (float,
e.g. ``--float-epochs`` equal to ``--epochs``, or ternary; wider or deeper models too), as
long as inputs and classes match; or several, comma-separated, whose mean logits teach
(an ensemble).

Speed: ``--matmul bfloat16`` takes the ternary layers' training products over the codes in
bfloat16 (exact inputs, bfloat16-rounded sums and gradients; inference stays exact), which
runs on AMX (recent Xeons) and tensor cores; with ``--compile`` (fused elementwise kernels)
a step of the cifar10-tiny QAT model at batch 128 on 2 AMX cores drops from 1.19 s to
0.52 s (measured with a synthetic batch; whole epochs including augmentation and the
held-out evaluation about 2x faster). ``--init RUN/best.pt`` starts from a trained run's
weights, for fine-tuning with a new schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyvit158.cli import prog
from tinyvit158.config import ViTConfig, get_preset, parse_set
from tinyvit158.data import Dataset, data_arg, load_cifar10, split_holdout  # noqa: F401 (split_holdout: re-exported)
from tinyvit158.errors import TinyViTError
from tinyvit158.files import check_output_folder, report_stale, same_file
from tinyvit158.train import convnet
from tinyvit158.train.augment import mixup_cutmix, random_crop_flip, random_erasing, trivial_augment
from tinyvit158.train.model import QATViT, evaluate, latent_state, normalize, to_input  # noqa: F401 (evaluate: re-exported)
from tinyvit158.train.state import load_checkpoint, load_run, model_from_state, save_checkpoint
from tinyvit158.weights import load_weights

MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Recipe:
    """Everything that defines a run; stored in the checkpoint and checked on resume."""

    preset: str = "cifar10-tiny"
    config_overrides: str = "{}"  # JSON of ViTConfig fields to change
    epochs: int = 100
    float_epochs: int = 0  # train in float first, then switch the ternary layers on
    act_only_epochs: int = 0  # then int8 activations with float weights (GPLQ's first stage; convert after)
    int8_epochs: int = 0  # then int8 weights per output channel (TerViT's progressive 8-bit stage), then ternary
    feature_distill: float = 0.0  # weight of an MSE between the student's and the teacher's final features
    attn_distill: float = 0.0  # weight of the KL between the teacher's and the student's attention maps (Q-ViT's DGD)
    batch: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    erase: float = 0.25
    trivial_augment: bool = True
    drop_path: float = 0.1
    grad_clip: float = 1.0
    holdout: int = 5000
    limit_train: int = 0  # use only this many training images (smoke tests); 0: all
    seed: int = 0
    teacher: str = ""  # a trainer checkpoint whose model teaches this one (knowledge distillation)
    distill: float = 0.0  # weight of the teacher's soft targets in the loss (0: no distillation)
    distill_temp: float = 4.0  # softmax temperature of the distillation term
    distill_hard: bool = False  # the teacher's term is cross-entropy with its argmax (DeiT's hard distillation)
    init: str = ""  # start from this trainer checkpoint's model weights (fine-tuning); "" : random
    matmul: str = "float32"  # dtype of the ternary layers' training products: float32 or bfloat16

    def config(self) -> ViTConfig:
        return get_preset(self.preset).replace(**json.loads(self.config_overrides))


def attention_kl(maps: list[list], teacher_maps: list[list]) -> torch.Tensor:
    """KL(teacher || student) of the attention rows, averaged over rows, heads and blocks
    (Q-ViT's distribution-guided distillation, on the maps themselves)."""
    total = 0.0
    for (s,), (t,) in zip(maps, teacher_maps, strict=True):
        total = total + (t * (torch.log(t.clamp_min(1e-12)) - torch.log(s.clamp_min(1e-12)))).sum(-1).mean()
    return total / len(maps)


def stage_of(epoch: int, r: Recipe) -> str:
    """What epoch ``epoch`` trains: "float", "act-only", "int8" or "ternary" (in that order)."""
    for stage, until in (("float", r.float_epochs), ("act-only", r.float_epochs + r.act_only_epochs),
                         ("int8", r.float_epochs + r.act_only_epochs + r.int8_epochs)):  # fmt: skip
        if epoch < until:
            return stage
    return "ternary"


def distill_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float, temp: float,
    hard: bool = False, smoothing: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """``(1 - alpha)`` x cross-entropy with the (smoothed, mixed) ``targets`` plus ``alpha`` x
    T^2 x KL(teacher || student) of the softmaxes at temperature T (Hinton, Vinyals and Dean
    2015: the T^2 keeps the soft term's gradients on the scale of the hard one's).
    ``hard``: the teacher's term is instead the cross-entropy with the teacher's argmax,
    label-smoothed by ``smoothing`` (DeiT's hard-label distillation, Touvron et al. 2021,
    which beat the soft term there). ``alpha = 0`` (or no teacher) is the plain cross-entropy."""
    ce = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    if teacher_logits is None or alpha == 0:
        return ce
    if hard:
        hard_ce = F.cross_entropy(logits, teacher_logits.argmax(1), label_smoothing=smoothing)
        return (1 - alpha) * ce + alpha * hard_ce
    kl = F.kl_div(
        F.log_softmax(logits / temp, dim=1), F.log_softmax(teacher_logits / temp, dim=1),
        reduction="batchmean", log_target=True,
    )  # fmt: skip
    return (1 - alpha) * ce + alpha * temp * temp * kl


class Ensemble(torch.nn.Module):
    """Several fixed teachers as one: the mean of their logits (``--teacher a.pt,b.pt``)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def load_teacher(path: str, cfg: ViTConfig, device: str) -> torch.nn.Module:
    """The teacher of ``--teacher``: one path, or several separated by commas, whose logits
    are averaged (an ensemble, stronger than each member; logits only)."""
    paths = [p for p in str(path).split(",") if p]
    if len(paths) > 1:
        return Ensemble([load_one_teacher(p, cfg, device) for p in paths]).eval()
    return load_one_teacher(paths[0] if paths else path, cfg, device)


def load_one_teacher(path: str, cfg: ViTConfig, device: str) -> torch.nn.Module:
    """A fixed teacher (eval mode, no gradients): a convolutional teacher
    (``python -m tinyvit158.train.teacher``, its ``teacher.pt``), a trained run's model
    (``last.pt`` or ``best.pt``; ternary or float as its run ended, a float teacher being
    ``--float-epochs`` equal to ``--epochs``) or a weight file's (its exact codes,
    ``QATViT.from_checkpoint``). Its architecture may differ from the student's; its
    inputs (size, channels, normalisation) and classes may not."""
    state = {} if str(path).endswith(".safetensors") else load_checkpoint(path, device)
    if state.get("kind") == convnet.KIND:
        model, theirs = convnet.load_teacher_model(state, path, device), _inputs(state)
    else:
        if str(path).endswith(".safetensors"):
            model = QATViT.from_checkpoint(load_weights(path)).to(device)
        else:
            model = model_from_state(state, path, device, as_trained=True)  # ternary or float as it ended
        model.set_exact(False)  # its soft targets need no bit-exactness: the float32 path is 2-3x faster
        model.requires_grad_(False)
        theirs = _inputs(model.cfg.to_dict())
    if theirs != _inputs(cfg.to_dict()):
        raise TinyViTError(f"teacher {path} takes other inputs or classes than the student ({cfg.name})")
    return model


def _inputs(fields: dict) -> tuple:
    """What a teacher must share with its student: input size, channels, normalisation, classes."""
    values = (fields[k] for k in ("image_size", "in_chans", "num_classes", "mean", "std"))
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in values)


# config fields a fine-tuning run may change from its --init weights (new numerics to learn)
RETRAINABLE = (
    "attention", "attention_bits", "attention_prob_bits", "attention_prob_clip", "qk_norm", "scale_granularity",
    "numerics", "bitlinear_norm",
)  # fmt: skip


NORM_FIT_IMAGES = 512  # training images that fit new BitLinear norms (fit_bitlinear_norms)


def _bitlinear_norm(key: str) -> bool:
    """A BitLinear layer's own LayerNorm tensor (``<layer>.norm.weight``, never the final ``norm.weight``)."""
    parts = key.split(".")
    return len(parts) > 2 and parts[-2] == "norm"


def _new_tensor(key: str) -> bool:
    """A tensor a fine-tuning run may add to its --init weights: the qk norms, BitLinear norms."""
    return key.split(".")[-2].endswith(("q_norm", "k_norm")) or _bitlinear_norm(key)


def init_from(model: QATViT, path: str, device: str, as_float: bool = False) -> list[str]:
    """Copy a trained run's model weights into ``model`` (same architecture) to fine-tune it.

    ``path`` may also be a weight file: its latent weights are then the codes times gamma
    over the group's fraction of non-zero codes (``model.latent_weights``), whose absmean
    ternarization gives back exactly the file's codes and (to float rounding) its gamma,
    so fine-tuning starts from the file's function; a float run (``as_float``: every epoch
    float) starts from ``codes x gamma``, the same function in float. The run may change the attention's
    numerics and the weight scales' granularity (:data:`RETRAINABLE`; e.g. TerViT's
    per-channel scales from a float run, ViT-1.58b's BitLinear norms); new tensors (the qk
    norms, the BitLinear norms) keep their initialization. Returns the layers whose
    BitLinear norms are new (:func:`fit_bitlinear_norms` fits them).
    """
    if str(path).endswith(".safetensors"):
        ckpt = load_weights(path)
        source_cfg, state = ckpt.config, latent_state(ckpt, as_float)
    else:
        source, _ = load_run(path, device)
        source_cfg, state = source.cfg, source.state_dict()
    fixed = [k for k in source_cfg.to_dict() if k not in RETRAINABLE]
    if any(getattr(source_cfg, k) != getattr(model.cfg, k) for k in fixed):
        raise TinyViTError(f"--init {path}: its model ({source_cfg.name}) has other fields than this run's "
                           f"(beyond {RETRAINABLE})")  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(map(_new_tensor, missing)):
        raise TinyViTError(f"--init {path}: tensors do not fit: missing {missing}, unexpected {unexpected}")
    print(f"starting from the weights of {path}", file=sys.stderr)
    return sorted({k.rsplit(".", 2)[0] for k in missing if _bitlinear_norm(k)})


def fit_bitlinear_norms(model: QATViT, images_u8: np.ndarray, layers: list[str]) -> None:
    """Fit the new BitLinear norms of ``layers`` so each layer's input stays what it was:
    per channel j, the least-squares line y_j ~ w_j LN(y)_j + b_j over the tokens of
    ``images_u8``, layer by layer in forward order (each fitted on inputs made by the
    fitted layers before it). Identity norms would rescale every token by its own spread
    and drop its mean; fitted, fine-tuning starts near the --init model's function."""

    def fit(mod, inputs):
        y = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        z = F.layer_norm(y, y.shape[-1:], eps=mod.norm.eps)
        zc, yc = z - z.mean(0), y - y.mean(0)
        w = (zc * yc).sum(0) / (zc * zc).sum(0).clamp_min(1e-12)
        mod.norm.weight.data.copy_(w.float())
        mod.norm.bias.data.copy_((y.mean(0) - w * z.mean(0)).float())

    hooks = [model.get_submodule(layer).register_forward_pre_hook(fit) for layer in layers]
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        model(normalize(to_input(images_u8), model.cfg).to(device))
    model.train(training)
    for h in hooks:
        h.remove()
    print(f"fitted the BitLinear norms of {len(layers)} layers on {len(images_u8)} training images", file=sys.stderr)


def lr_at(step: int, total: int, warmup: int, r: Recipe) -> float:
    if step < warmup:
        return r.lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def augment_batch(x: torch.Tensor, y: torch.Tensor, cfg: ViTConfig, r: Recipe, g: torch.Generator, rng):
    x = random_crop_flip(x, g)
    if r.trivial_augment:
        x = trivial_augment(x, g)
    x = normalize(x, cfg)
    x, t = mixup_cutmix(x, y, cfg.num_classes, g, rng, r.smoothing, r.mixup, r.cutmix, r.mix_prob)
    if r.erase > 0:
        x = random_erasing(x, g, r.erase)
    return x, t


class EpochBatches(torch.utils.data.Dataset):
    """The augmented batches of one epoch; batch s draws only from generators seeded with (seed, epoch, s)."""

    def __init__(self, data: Dataset, order: np.ndarray, recipe: Recipe, epoch: int):
        self.data, self.order, self.recipe, self.epoch = data, order, recipe, epoch
        self.cfg = recipe.config()

    def __len__(self) -> int:
        return len(self.order) // self.recipe.batch

    def __getitem__(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.recipe
        b = self.order[s * r.batch : (s + 1) * r.batch]
        seed = np.random.SeedSequence([r.seed, self.epoch, s]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        rng = np.random.default_rng([r.seed, self.epoch, s])
        return augment_batch(to_input(self.data.images[b]), torch.from_numpy(self.data.labels[b]), self.cfg, r, g, rng)


def epoch_loader(batches: EpochBatches, workers: int, device: str) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=device.startswith("cuda"), prefetch_factor=4 if workers else None,
    )  # fmt: skip


def check_run_folder(out: Path, inputs: list[str]) -> None:
    """Refuse a run folder that is a file, or that holds an input the run would write over
    (``--init RUN/best.pt --out RUN`` would replace best.pt with the new run's)."""
    check_output_folder(out)
    for name in ("last.pt", "best.pt"):
        report_stale(out / name)
    for src in filter(None, inputs):
        src = Path(src)
        if src.exists() and same_file(src.parent, out) and re.fullmatch(r"best\.pt|last\.pt|epoch-\d+\.pt", src.name):
            raise TinyViTError(f"--out {out}: holds {src.name}, an input of this run that it would write over; "
                               "choose another --out (or copy the file away first)")  # fmt: skip


def train(
    recipe: Recipe, data_path: str, out: Path, device: str = "cpu", max_minutes: float = 0.0,
    progress: bool = True, workers: int = 0, compile: str = "", snapshots: int = 0,
) -> dict:  # fmt: skip
    """Run (or resume) a recipe; returns the last epoch's log record. ``snapshots``: also
    keep the model of each of the last that many epochs as ``out/epoch-NNN.pt`` (to average)."""
    check_run_folder(out, [recipe.init, *recipe.teacher.split(",")] if recipe.teacher else [recipe.init])
    out.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores (10-bit mantissa)
    cfg = recipe.config()
    torch.manual_seed(recipe.seed)
    model = QATViT(cfg, drop_path=recipe.drop_path).to(device)
    if recipe.matmul not in MATMUL_DTYPES:
        raise TinyViTError(f"--matmul {recipe.matmul!r}: choose one of {', '.join(MATMUL_DTYPES)}")
    model.set_matmul_dtype(MATMUL_DTYPES[recipe.matmul])
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999))
    if (recipe.distill or recipe.feature_distill or recipe.attn_distill) and not recipe.teacher:
        raise TinyViTError(
            "--distill, --feature-distill and --attn-distill need --teacher (a trainer checkpoint or weight file)"
        )
    start_epoch, best = 0, 0.0
    last = out / "last.pt"
    new_norms: list[str] = []
    if last.exists():
        state = load_checkpoint(last, device)
        saved = {**asdict(Recipe()), **state["recipe"]}  # runs from before a field existed had its default
        if saved != asdict(recipe):
            changed = {k: (saved.get(k), v) for k, v in asdict(recipe).items() if saved.get(k) != v}
            raise TinyViTError(
                f"{last} was trained with a different recipe {changed}; use another --out or the same options"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best_val_acc"]
        print(f"resuming {last} after epoch {start_epoch} (best val acc {best:.4f})", file=sys.stderr)
    elif recipe.init:
        new_norms = init_from(model, recipe.init, device, as_float=recipe.float_epochs >= recipe.epochs)
    if start_epoch >= recipe.epochs:
        print(f"{out}: all {recipe.epochs} epochs done", file=sys.stderr)
        return {"epoch": start_epoch, "best_val_acc": best}

    distilling = recipe.teacher and (recipe.distill or recipe.feature_distill or recipe.attn_distill)
    teacher = load_teacher(recipe.teacher, cfg, device) if distilling else None
    if (recipe.feature_distill or recipe.attn_distill) and not isinstance(teacher, QATViT):
        raise TinyViTError(
            "--feature-distill and --attn-distill need one ViT teacher; a conv teacher or an ensemble gives logits only"
        )
    data = load_cifar10(data_path, "train", progress=progress)
    train_idx, val_idx = split_holdout(data.labels, recipe.holdout, recipe.seed)
    if recipe.limit_train:
        train_idx = train_idx[: recipe.limit_train]
        val_idx = val_idx[: max(recipe.limit_train // 4, 10)]
    if new_norms:
        fit_bitlinear_norms(model, data.images[np.sort(train_idx)[:NORM_FIT_IMAGES]], new_norms)
    steps_per_epoch = len(train_idx) // recipe.batch
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = steps_per_epoch * recipe.warmup_epochs
    forward = torch.compile(model, mode=compile) if compile else model  # same parameters, fused kernels
    t_start = time.time()
    record: dict = {}
    for epoch in range(start_epoch, recipe.epochs):
        torch.manual_seed(recipe.seed * 100_003 + epoch)
        order = np.random.default_rng([recipe.seed, epoch]).permutation(train_idx)
        quantize = epoch >= recipe.float_epochs
        stage = stage_of(epoch, recipe)
        model.set_quantize(quantize)
        model.set_weights({"act-only": "float", "int8": "int8"}.get(stage, "ternary"))
        model.train()
        t0, seen = time.time(), 0
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        batches = epoch_loader(EpochBatches(data, order, recipe, epoch), workers, device)
        if progress:
            batches = tqdm(
                batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="step", mininterval=5, leave=False,
                total=steps_per_epoch,
            )  # fmt: skip
        for s, (x, t) in enumerate(batches):
            step = epoch * steps_per_epoch + s
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, recipe)
            x, t = x.to(device, non_blocking=True), t.to(device, non_blocking=True)
            if compile == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: this step's buffers are new
            teacher_logits = None
            if recipe.attn_distill:
                maps, teacher_maps = model.keep_attention(True), teacher.keep_attention(True)
            if recipe.feature_distill or recipe.attn_distill:  # features (GPLQ) or attention maps (DGD) too
                feats = model.forward_features(x)
                logits = model.forward_head(feats)
                with torch.no_grad():
                    teacher_feats = teacher.forward_features(x)
                    teacher_logits = teacher.forward_head(teacher_feats)
            else:
                logits = forward(x)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
            loss = distill_loss(
                logits, t, teacher_logits, recipe.distill, recipe.distill_temp, recipe.distill_hard, recipe.smoothing
            )
            if recipe.feature_distill:
                loss = loss + recipe.feature_distill * F.mse_loss(feats, teacher_feats)
            if recipe.attn_distill:
                loss = loss + recipe.attn_distill * attention_kl(maps, teacher_maps)
                model.keep_attention(False)
                teacher.keep_attention(False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            seen += len(x)
            loss_sum += loss.detach() * len(x)  # summed on the device: no sync per step
            correct += (logits.argmax(1) == t.argmax(1)).sum()
            if progress and s % 25 == 24:
                batches.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    ips=f"{seen / (time.time() - t0):.0f}",
                    refresh=False,
                )
        loss_sum, correct = loss_sum.item(), correct.item()
        val = evaluate(model, data, val_idx, device)
        final = stage == stage_of(recipe.epochs - 1, recipe)  # best.pt: the best model of the final numerics
        best_now = final and val["acc"] > best  # (a float run's: its float epochs)
        best = max(best, val["acc"]) if final else best
        record = {
            "epoch": epoch + 1, "quantized": quantize, "stage": stage, "lr": opt.param_groups[0]["lr"],
            "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "val_loss": val["loss"], "val_acc": val["acc"], "best_val_acc": best,
            "images_per_s": seen / (time.time() - t0), "epoch_s": time.time() - t0,
        }  # fmt: skip
        state = {
            "recipe": asdict(recipe), "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "epoch": epoch + 1, "best_val_acc": best, "log": record,
            "torch": str(torch.__version__), "threads": torch.get_num_threads(), "device": device,
        }  # fmt: skip
        save_checkpoint(state, last)
        weights_only = {k: v for k, v in state.items() if k != "optimizer"}
        if best_now:
            save_checkpoint(weights_only, out / "best.pt")
        if epoch + 1 > recipe.epochs - snapshots:
            save_checkpoint(weights_only, out / f"epoch-{epoch + 1:03d}.pt")
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"epoch {epoch + 1}/{recipe.epochs} {stage}: loss {record['train_loss']:.3f} "
            f"val acc {val['acc']:.4f} (best {best:.4f}) {record['images_per_s']:.0f} img/s {record['epoch_s']:.0f} s",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        if max_minutes and (time.time() - t_start) / 60 >= max_minutes and epoch + 1 < recipe.epochs:
            print(f"stopping after {max_minutes} minutes; rerun the same command to resume", file=sys.stderr)
            break
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("tinyvit158.train"),
        description="Train a ternary (QAT) ViT on CIFAR-10; rerun the same command to resume.",
    )
    p.add_argument(
        "--data", help="CIFAR-10: folder with the zips, a zip, or the python tarball (default: TINYVIT158_DATA)"
    )
    p.add_argument("--out", required=True, type=Path, help="run folder: last.pt, best.pt, log.jsonl")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="processes that augment batches (0: in the main one)")
    p.add_argument(
        "--compile", nargs="?", const="default", default="", metavar="MODE",
        help="torch.compile the model (faster steps on a GPU or CPU); MODE e.g. reduce-overhead (CUDA graphs)",
    )  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after the epoch that passes this (0: never)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--snapshots", type=int, default=0, metavar="K",
        help="keep the models of the last K epochs as OUT/epoch-NNN.pt (for python -m tinyvit158.train.average)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="change a ViTConfig field (JSON value)"
    )
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        if name == "config_overrides":
            continue
        flag = "--" + name.replace("_", "-")
        what = f"{RECIPE_HELP[name]} (default: {value!r})"
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value, metavar="BOOL",
                           help=what)  # fmt: skip
        else:
            p.add_argument(flag, type=type(value), default=value, help=what)
    return p


RECIPE_HELP = {
    "preset": "model shapes: cifar10-tiny, deit-tiny, deit-small, vit-base-16 (change fields with --set)",
    "epochs": "epochs in all (the cosine schedule spans them)",
    "float_epochs": "epochs in float before the ternary layers switch on (= --epochs: a float model)",
    "batch": "images a step",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine schedule",
    "weight_decay": "AdamW weight decay (not on norms, biases and embeddings)",
    "warmup_epochs": "epochs of linear warm-up",
    "smoothing": "label smoothing",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "mix_prob": "probability that a batch is mixed (mixup or cutmix)",
    "erase": "random erasing probability",
    "trivial_augment": "TrivialAugment on every image",
    "drop_path": "stochastic depth rate of the last block (linear from 0)",
    "grad_clip": "gradient norm clip (0: off)",
    "holdout": "training images held out for validation (the choice criterion)",
    "limit_train": "use only this many training images (smoke tests; 0: all)",
    "seed": "seed of the split, the order and the augmentations",
    "teacher": "knowledge distillation: a conv teacher (RUN/teacher.pt), a trained run (RUN/last.pt) or a weight "
    "file; several, comma-separated: the mean of their logits",
    "distill": "weight of the teacher's soft targets in the loss (0: no distillation)",
    "distill_temp": "softmax temperature of the distillation term",
    "distill_hard": "the teacher's term is cross-entropy with its argmax (DeiT's hard-label distillation)",
    "act_only_epochs": "after the float epochs: int8 activations, float weights (GPLQ's stage 1; then convert)",
    "int8_epochs": "then int8 weights per output channel (TerViT's 8-bit stage) before ternary",
    "feature_distill": "weight of an MSE between the final features and the teacher's (GPLQ's feature mimicking)",
    "attn_distill": "weight of the KL between the teacher's attention maps and the student's (Q-ViT's DGD)",
    "init": "start from a trained run's weights (RUN/best.pt) or a weight file's codes (fine-tuning)",
    "matmul": "dtype of the ternary layers' training products: float32 or bfloat16 (AMX, tensor cores)",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {k: getattr(args, k) for k in asdict(Recipe()) if k != "config_overrides"}
    args.data = data_arg(build_parser(), args.data)
    try:
        overrides = parse_set(args.set)
        recipe = Recipe(**fields, config_overrides=json.dumps(overrides, sort_keys=True))
        recipe.config()
        train(
            recipe, args.data, args.out, args.device, args.max_minutes,
            progress=not args.no_progress, workers=args.workers, compile=args.compile, snapshots=args.snapshots,
        )  # fmt: skip
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
