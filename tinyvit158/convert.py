"""Convert a model to a weight file: ``python -m tinyvit158.convert SRC --out F.safetensors``.

Sources so far:

- a tinyvit158 weight file, with ``--set KEY=VALUE`` changes to the numerics that leave
  its tensors as they are: the attention mode and code widths (``attention``,
  ``attention_bits``, ``attention_prob_bits``: post-training quantized attention), the
  packing (the codes are re-packed), the name and class names. Anything that changes
  shapes or needs new tensors (``qk_norm``) is refused in one line: that needs training
  (``python -m tinyvit158.train --init FILE ...``).

The result is validated and written atomically, and its ``source`` metadata records the
file it came from and the changes; with ``--data`` also the engine's accuracy on the
CIFAR-10 test split (``engine_test_acc``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyvit158.cli import prog
from tinyvit158.config import parse_set
from tinyvit158.errors import TinyViTError
from tinyvit158.packing import pack
from tinyvit158.weights import Checkpoint, load_weights, save_weights

# config fields a weight file can change without new or reshaped tensors
NUMERICS = ("name", "class_names", "attention", "attention_bits", "attention_prob_bits", "packing")


def change_numerics(ckpt: Checkpoint, changes: dict, source_name: str = "") -> Checkpoint:
    """``ckpt`` with the config fields in ``changes`` (only :data:`NUMERICS`) changed."""
    fixed = sorted(set(changes) - set(NUMERICS))
    if fixed:
        raise TinyViTError(
            f"--set {', '.join(fixed)}: a weight file's {'field' if len(fixed) == 1 else 'fields'} cannot change "
            f"without training (only {', '.join(NUMERICS)} can); train with --init {source_name or 'FILE'} instead"
        )
    cfg = ckpt.config.replace(**changes)
    tensors = dict(ckpt.tensors)
    if cfg.packing != ckpt.config.packing:
        for layer in cfg.linear_shapes():
            if cfg.is_ternary(layer):
                tensors[f"{layer}.weight_packed"] = pack(ckpt.ternary(layer)[0], cfg.packing)
    source = {"converted_from": {"file": source_name, "changes": changes, "source": ckpt.source}}
    return Checkpoint(cfg, tensors, source)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("tinyvit158.convert"), description=__doc__.splitlines()[0])
    p.add_argument("source", help="a tinyvit158 weight file (.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="the weight file to write")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="change a config field (JSON value or plain string), e.g. --set attention=int8 --set attention_bits=4",
    )  # fmt: skip
    p.add_argument("--data", help="CIFAR-10 location: record the engine's test accuracy in the file")
    args = p.parse_args(argv)
    try:
        ckpt = change_numerics(load_weights(args.source), parse_set(args.set), Path(args.source).name)
        if args.data:
            from tinyvit158.data import load_cifar10
            from tinyvit158.engine import Engine
            from tinyvit158.evaluate import run_engine

            test = load_cifar10(args.data, "test", progress=True)
            logits, _ = run_engine(Engine(ckpt), test.images, ckpt.config, 500, "engine")
            ckpt.source.update(engine_test_acc=float((logits.argmax(1) == test.labels).mean()), test_images=len(test))
        save_weights(args.out, ckpt)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = ckpt.config
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): {cfg.name}, attention {cfg.attention}")
    if "engine_test_acc" in ckpt.source:
        print(f"engine test accuracy: {ckpt.source['engine_test_acc']:.4f} on {ckpt.source['test_images']} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
