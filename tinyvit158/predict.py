"""Classify images with a ternary ViT: ``python -m tinyvit158.predict IMAGE [IMAGE ...]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from tinyvit158.cli import prog
from tinyvit158.cluster import add_arguments as add_ray_arguments
from tinyvit158.errors import TinyViTError
from tinyvit158.files import shown
from tinyvit158.ledger import count, format_ledger
from tinyvit158.pipeline import classify, engine_name, image_paths, load_model, numerics_line, usable_workers

EPILOG = """\
Images (PNG, JPEG, BMP, GIF (first frame), WebP, TIFF, ...) are converted to RGB (EXIF
orientation applied; transparency composited on the model's mean colour; 16-bit, float and
CMYK images supported), the shorter side is resized to the model's image size (bicubic,
antialiased) and the centre square is cropped, then normalized with the model's mean/std.
Images under 8x8 pixels, and decompression bombs (Pillow's guard), are refused.
A folder argument means every image file directly inside it. URLs are not fetched.
Every image gets one of the model's classes (CIFAR-10's ten for the shipped weights), also
a picture of something else: a low top probability is the only hint.

exit status:
  0  every image was classified
  1  bad input: an unreadable image (the others are still classified) or weight file
  2  usage error (unknown option, --top-k out of range)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("tinyvit158.predict"),
        description="Classify images with a ternary (1.58-bit) Vision Transformer. Every image gets one of the "
        "model's classes (the 10 CIFAR-10 labels for the shipped weights), whatever it shows: there is no "
        "'none of these' answer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of images")
    p.add_argument(
        "--weights", metavar="FILE",
        help="a tinyvit158 .safetensors weight file (default: the shipped cifar10-tiny-int, in integer numerics)",
    )  # fmt: skip
    p.add_argument("--top-k", type=int, default=2, metavar="K", help="how many labels to report per image (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    p.add_argument(
        "--explain", action="store_true",
        help="also print the arithmetic ledger of the run: operations, bytes and energy, float32 vs ternary",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=64, metavar="B", help="images per engine call (default 64)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="decode images in N processes (default 1)")
    p.add_argument(
        "--engine", choices=("fast", "oracle"), default="fast",
        help="fast: the Numba integer engine (default); oracle: the float64 reference model",
    )  # fmt: skip
    add_ray_arguments(p)
    return p


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (``predict ... | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.workers < 1:
        parser.error("--batch and --workers must be at least 1")
    if args.ray and Path(args.ray).exists():  # ``--ray IMAGE ...``: an image, not a cluster address
        args.images.insert(0, args.ray)
        args.ray = ""
    if args.ray is not None and (args.explain or args.engine != "fast"):
        parser.error("--ray runs the fast engine without --explain")
    try:
        ckpt, weights_name = load_model(args.weights)
        cfg = ckpt.config
        args.engine = engine_name(cfg, args.engine)
        if not 1 <= args.top_k <= cfg.num_classes:
            parser.error(f"--top-k must be between 1 and {cfg.num_classes} (the model's classes), got {args.top_k}")
        files = image_paths(args.images)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    status, first_good, header, record = 0, None, args.json, None
    width = max(len(shown(f)) for f in files)
    # images are decoded (in --workers processes) and classified a batch at a time, and each
    # line is printed as its batch is done: memory stays flat however many files there are
    results = classify(files, ckpt, args.batch, usable_workers(args.workers), args.engine, args.ray, args.actors,
                       args.explain, args.ray_timeout)  # fmt: skip
    while True:
        try:
            idx, logits, errors, batch_record = next(results)
        except StopIteration:
            break
        except TinyViTError as e:  # Ray could not start or reach its cluster
            print(f"error: {e}", file=sys.stderr)
            return 1
        record = record if record is not None else batch_record
        probs = iter(softmax(np.asarray(logits, dtype=np.float64)))
        for i in idx:
            f = str(files[i]) if args.json else shown(files[i])  # JSON escapes what it must itself
            if i in errors:
                print(f"error: {errors[i]}", file=sys.stderr)
                status = 1
                if args.json:  # a record for every file, in order: its top-k or its error
                    print(json.dumps({"file": f, "error": errors[i]}), flush=True)
                continue
            first_good = first_good or f
            p = next(probs)
            top = [(cfg.class_names[k], float(p[k])) for k in np.argsort(-p, kind="stable")[: args.top_k]]
            if args.json:
                print(json.dumps({"file": f, "top_k": [{"label": lab, "probability": round(q, 6)} for lab, q in top]}),
                      flush=True)  # fmt: skip
                continue
            if not header:
                print(f"# weights: {shown(weights_name)}; {args.engine} engine")
                print(f"{'file':<{width}}  {'label':<12} {'prob':>6}  next best")
                header = True
            (lab, q), rest = top[0], top[1:]
            nxt = ", ".join(f"{lab2} {q2:.3f}" for lab2, q2 in rest)
            print(f"{f:<{width}}  {lab:<12} {q:6.3f}  {nxt}", flush=True)
    if args.explain and first_good is not None:
        out = sys.stdout if not args.json else sys.stderr
        print(f"\n# arithmetic ledger, per image ({first_good}; blocks summed)", file=out)
        print(format_ledger(count(ckpt, record if args.engine == "fast" else None)), file=out)
        print(numerics_line(ckpt.config, args.engine), file=out)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
