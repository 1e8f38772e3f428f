"""Accuracy on CIFAR-10 or a labelled image folder: ``python -m tinyvit158.evaluate --data PATH``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from tqdm import tqdm

from tinyvit158.cli import prog
from tinyvit158.cluster import add_arguments as add_ray_arguments
from tinyvit158.data import data_arg, load_cifar10
from tinyvit158.errors import TinyViTError
from tinyvit158.files import shown
from tinyvit158.folders import is_labelled_folder, load_labelled_folder
from tinyvit158.image import normalize
from tinyvit158.pipeline import classify, engine_name, load_model, make_model, run_engine, usable_workers
from tinyvit158.runtime import first_run_notice

EPILOG = """\
--data accepts: the folder holding cifar10-test-jpg.zip (default: $TINYVIT158_DATA), the zip
itself, an extracted folder test/<class>/*.jpg, the official cifar-10-python.tar.gz, or its
extracted cifar-10-batches-py folder; or any labelled folder ROOT/<class name>/<image>
(ImageNet-val style) whose folder names are the model's class names (or map to them
through --class-map FILE, JSON folder -> class), decoded in --workers processes.

exit status: 0 success; 1 bad data or weight file; 2 usage error
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("tinyvit158.evaluate"),
        description="Top-1 accuracy, per-class accuracy and confusion matrix on CIFAR-10 or a labelled folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="CIFAR-10 location (default: $TINYVIT158_DATA)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split (default test)")
    p.add_argument(
        "--weights", metavar="FILE", help="weight file (default: the shipped cifar10-tiny-int, in integer numerics)"
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images (classes interleaved)")
    p.add_argument("--batch", type=int, default=250, metavar="B", help="images per engine call (default 250)")
    p.add_argument("--engine", choices=("fast", "oracle"), default="fast", help="which implementation (default fast)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--class-map", metavar="FILE", help="labelled folders: JSON object, folder name -> class name")
    p.add_argument(
        "--workers", type=int, default=1, metavar="N", help="labelled folders: decode in N processes (default 1)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="labelled folders: an unreadable image ends the run (exit 1) instead of being skipped and counted",
    )
    p.add_argument(
        "--compare-torch", metavar="CHECKPOINT",
        help="also run the PyTorch model (a trainer .pt, or the weight file's torch twin) and report agreement",
    )  # fmt: skip
    add_ray_arguments(p)
    return p


def confusion(labels: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def load_torch_twin(checkpoint: str):
    """The PyTorch model of a weight file or trainer checkpoint (``train.state.load_torch_twin``)."""
    try:
        from tinyvit158.train.state import load_torch_twin as load  # the train extra (torch)
    except ImportError:
        raise TinyViTError("--compare-torch needs PyTorch: pip install -e '.[train]'") from None
    return load(checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.ray is not None and (args.engine != "fast" or args.compare_torch):
        parser.error("--ray runs the fast engine, without --compare-torch")
    try:
        data_path = data_arg(parser, args.data)
        ckpt, weights_name = load_model(args.weights)
        cfg = ckpt.config
        args.engine = engine_name(cfg, args.engine)
        twin = load_torch_twin(args.compare_torch) if args.compare_torch else None  # fails before the long run
        if is_labelled_folder(data_path):
            if twin is not None:
                raise TinyViTError("--compare-torch takes CIFAR-10 data, not a labelled folder")
            return _evaluate_folder(args, data_path, ckpt, weights_name)
        if args.ray is not None:
            raise TinyViTError("--ray takes a labelled folder (ROOT/<class>/<image>), not the CIFAR-10 archives")
        data = load_cifar10(data_path, args.split, limit=args.limit, progress=True)
        if cfg.image_size != 32 or cfg.num_classes != 10:
            raise TinyViTError(
                f"{weights_name}: a {cfg.image_size}px, {cfg.num_classes}-class model cannot be scored on CIFAR-10"
            )
        model = make_model(ckpt, args.engine)
        with first_run_notice():  # compiles on a new install: not counted in images/s
            model(normalize(data.images[0], cfg)[None])
        logits, seconds = run_engine(model, data.images, cfg, args.batch, f"{args.engine} engine")
        torch_logits = None
        if twin is not None:
            from tinyvit158.train.model import torch_logits as twin_logits  # the train extra (torch)

            torch_logits = twin_logits(twin, data.images)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    return report(args, cfg, weights_name, f"CIFAR-10 {args.split}", data.labels, data.names, logits, seconds,
                  torch_logits)  # fmt: skip


def _evaluate_folder(args, root, ckpt, weights_name) -> int:
    """Accuracy on ``root/<class>/<image>``, the images decoded in worker processes, streamed
    (or on Ray: ``--ray``). An unreadable image is skipped and counted (``--strict``: exit 1)."""
    cfg = ckpt.config
    try:
        folder = load_labelled_folder(root, cfg, args.class_map)
        keep = np.arange(len(folder.paths))
        if args.limit is not None and args.limit < len(keep):
            keep = np.linspace(0, len(keep) - 1, args.limit).astype(int)  # every class (folders are sorted)
        paths = [folder.paths[i] for i in keep]
        out, bad = [], {}
        workers = usable_workers(args.workers)
        t0 = time.perf_counter()
        batches = classify(paths, ckpt, args.batch, workers, args.engine, args.ray, args.actors,
                           ray_timeout=args.ray_timeout)  # fmt: skip
        bar = None  # shown from the first batch on: an error before it (Ray unreachable) stays one line
        try:
            for idx, logits, errors, _ in batches:
                if errors and args.strict:
                    raise TinyViTError(next(iter(errors.values())) + " (--strict)")
                bad.update(errors)
                out.append(logits)
                if bar is None:
                    bar = tqdm(total=len(paths), desc=f"{args.engine} engine", unit="img", file=sys.stderr, leave=False)
                bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        if len(bad) == len(paths):
            raise TinyViTError(f"{root}: none of its {len(paths)} images could be read (first: {bad[0]})")
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    good = np.array([i not in bad for i in range(len(paths))], dtype=bool)
    names = [folder.names[i] for i in keep]
    skipped = [{"image": names[i], "error": bad[i]} for i in sorted(bad)]
    for s in skipped:
        print(f"skipped: {s['error']}", file=sys.stderr)
    logits = np.concatenate(out).astype(np.float32)
    names = [n for n, g in zip(names, good, strict=True) if g]
    return report(args, cfg, weights_name, f"folder {root}", folder.labels[keep][good], names, logits, seconds, None,
                  skipped)  # fmt: skip


def report(args, cfg, weights_name, what, labels, names, logits, seconds, torch_logits, skipped=()) -> int:
    """Accuracy, per-class accuracy, confusion matrix (and agreement with a PyTorch model);
    ``skipped``: the unreadable images left out, ``{"image", "error"}`` each."""
    pred = logits.argmax(1)
    m = confusion(labels, pred, cfg.num_classes)
    per_class = np.diag(m) / np.maximum(m.sum(1), 1)
    result = {
        "weights": weights_name, "engine": args.engine, "data": what, "images": len(labels),
        "accuracy": float((pred == labels).mean()),
        "classes": list(cfg.class_names),  # the order of the confusion matrix's rows and columns
        "per_class": {c: float(a) for c, a in zip(cfg.class_names, per_class, strict=False)},
        "confusion": m.tolist(), "images_per_s": len(labels) / seconds,
        "predictions": [{"image": n, "predicted": cfg.class_names[k]} for n, k in zip(names, pred, strict=True)],
        "skipped": list(skipped),
    }  # fmt: skip
    if torch_logits is not None:
        tpred = torch_logits.argmax(1)
        diff = np.flatnonzero(tpred != pred)
        top2 = np.sort(torch_logits, axis=1)[:, -2:]
        result["torch_accuracy"] = float((tpred == labels).mean())
        result["agreement"] = float(1 - len(diff) / len(labels))
        result["disagreements"] = [
            {"image": names[i], "label": cfg.class_names[labels[i]], "engine": cfg.class_names[pred[i]],
             "torch": cfg.class_names[tpred[i]], "torch_top2_margin": float(top2[i, 1] - top2[i, 0]),
             "max_logit_diff": float(np.abs(logits[i] - torch_logits[i]).max())}
            for i in diff
        ]  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"# {shown(weights_name)}, {args.engine} engine, {shown(what)}: {len(labels)} images")
    if skipped:
        print(f"# skipped {len(skipped)} unreadable image(s) (listed on stderr; --strict makes them fatal)")
    print(f"top-1 accuracy: {result['accuracy']:.4f}   ({result['images_per_s']:.0f} images/s)")
    width = max(len(c) for c in cfg.class_names)
    print("\nper class" + " " * (width - 3) + "acc   confusion (rows: label, columns: predicted)")
    print(" " * (width + 11) + " ".join(f"{c[:4]:>4}" for c in cfg.class_names))
    for c, a, row in zip(cfg.class_names, per_class, m, strict=False):
        print(f"  {c:<{width}}  {a:.3f}  " + " ".join(f"{v:4d}" for v in row))
    if torch_logits is not None:
        print(f"\nPyTorch model accuracy: {result['torch_accuracy']:.4f}")
        print(
            f"agreement (same predicted class): {result['agreement']:.4%}, "
            f"{len(result['disagreements'])} disagreement(s)"
        )
        for d in result["disagreements"]:
            print(
                f"  {shown(d['image'])}: engine {d['engine']}, torch {d['torch']} (label {d['label']}); "
                f"torch top-2 margin {d['torch_top2_margin']:.2e}, max logit diff {d['max_logit_diff']:.2e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
