"""Export a trained QAT checkpoint to the engine's weight file.

``python -m tinyvit158.train.export RUN/best.pt --out weights/cifar10-tiny.safetensors [--data PATH]``

A name-preserving ternarize-and-pack: every ternary layer's latent float weight goes
through ``quant.ternarize`` (the one implementation the engine's tests check) and is
packed; everything else is copied as float32. The exporter checks that the codes and
scales equal the ones the PyTorch model uses in its forward pass (``ternarize_weight``
computes them the same way, in float64) and reports any that differ (recorded in
``source`` as ``codes_differing_from_torch``; 0 expected). With ``--data`` it measures the PyTorch model's test
accuracy and records it, with the recipe, in the file's ``source`` metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from tinyvit158.cli import prog
from tinyvit158.data import load_cifar10
from tinyvit158.errors import TinyViTError
from tinyvit158.files import check_output
from tinyvit158.packing import pack
from tinyvit158.quant import ternarize
from tinyvit158.train.model import QATViT, ternarize_weight, torch_logits
from tinyvit158.train.state import load_checkpoint, load_run
from tinyvit158.weights import Checkpoint, load_weights, save_weights, tensor_spec


def to_checkpoint(model: QATViT, source: dict) -> tuple[Checkpoint, int]:
    """The weight-file checkpoint of a QAT model, and how many codes and scales differ from
    the ones its forward pass uses (0: the file and the model are one function)."""
    cfg = model.cfg
    sd = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    tensors: dict[str, np.ndarray] = {}
    differing = 0
    for name, (_, shape) in tensor_spec(cfg).items():
        if name.endswith(".weight_packed"):
            layer = name[: -len(".weight_packed")]
            w = sd[f"{layer}.weight"]
            codes, scale = ternarize(w.numpy(), cfg.scale_granularity)
            torch_codes, torch_gamma = ternarize_weight(w, cfg.scale_granularity)
            differing += int((torch_codes.numpy().astype(np.int8) != codes).sum())
            differing += int((torch_gamma.numpy()[:, 0] != scale).sum())
            tensors[name] = pack(codes, cfg.packing)
            tensors[f"{layer}.weight_scale"] = scale
        elif name.endswith(".weight_scale"):
            continue
        else:
            tensors[name] = sd[name].numpy().reshape(shape).astype(np.float32)
    tensors = {name: tensors[name] for name in tensor_spec(cfg)}
    return Checkpoint(cfg, tensors, source), differing


def portable_recipe(recipe):
    """``recipe`` with each absolute path of its ``init`` and ``teacher`` (comma-separated)
    cut to its run folder and file name (``BL1/best.pt``): a shipped file names no machine's paths."""
    if not isinstance(recipe, dict):
        return recipe
    out = dict(recipe)
    for key in ("init", "teacher"):
        if isinstance(out.get(key), str) and out[key]:
            paths = [Path(p) for p in out[key].split(",")]
            out[key] = ",".join(str(Path(*p.parts[-2:])) if p.is_absolute() else str(p) for p in paths)
    return out


def lineage(state: dict, limit: int = 20) -> list[dict]:
    """The runs a fine-tuned checkpoint grew from (its recipe's ``init``, that run's ``init``,
    ...), nearest first: each one's checkpoint file name, epoch, device, torch and recipe; a
    weight file ends the chain with its name, its SHA-256 and its own ``source`` metadata."""
    chain = []
    while (state.get("recipe") or {}).get("init") and len(chain) < limit:
        path = Path(state["recipe"]["init"])
        if not path.exists():
            chain.append({"checkpoint": str(path), "missing": True})
            break
        if path.suffix == ".safetensors":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            chain.append({"weight_file": path.name, "sha256": digest, "source": load_weights(path).source})
            break
        state = load_checkpoint(path)
        chain.append({
            "checkpoint": f"{path.parent.name}/{path.name}", "epoch": state.get("epoch"), "device": state.get("device"),
            "torch": state.get("torch"), "recipe": portable_recipe(state.get("recipe")),
        })  # fmt: skip
    return chain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("tinyvit158.train.export"), description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a trainer checkpoint (RUN/best.pt or RUN/last.pt)")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--packing", choices=("ternary2", "ternary3"), help="override the config's packing")
    p.add_argument("--name", help="the model's name in the file's config (default: the run's)")
    p.add_argument("--data", help="CIFAR-10 location: measure the PyTorch model's test accuracy")
    args = p.parse_args(argv)
    try:
        check_output(args.out, [args.checkpoint])
        model, state = load_run(args.checkpoint)
        if args.packing:
            model.cfg = model.cfg.replace(packing=args.packing)
        if args.name:
            model.cfg = model.cfg.replace(name=args.name)
        log = state.get("log", {})
        source = {
            "recipe": portable_recipe(state.get("recipe")),
            "epochs": state.get("epoch"),
            "seed": (state.get("recipe") or {}).get("seed"),
            "data": "CIFAR-10 train split (JPEG zip), 5,000 images held out for validation",
            "torch": state.get("torch"),
            "device": state.get("device"),
            "val_acc": log.get("val_acc"),
            "checkpoint": Path(args.checkpoint).name,
        }
        if parents := lineage(state):
            source["fine_tuned_from"] = parents
        if "averaged" in state:
            source["averaged"] = state["averaged"]  # tinyvit158.train.average: the mean of these epochs
        if args.data:
            test = load_cifar10(args.data, "test", progress=True)
            pred = torch_logits(model, test.images).argmax(1)
            source["torch_test_acc"] = float((pred == test.labels).mean())
            source["test_images"] = len(test)
        ckpt, differing = to_checkpoint(model, source)
        ckpt.source["codes_differing_from_torch"] = differing
        save_weights(args.out, ckpt)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes); codes or scales differing from torch's: {differing}")
    if "torch_test_acc" in source:
        print(f"PyTorch model test accuracy: {source['torch_test_acc']:.4f} on {source['test_images']} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
