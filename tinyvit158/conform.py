"""Conformance of an integer-numerics implementation: ``python -m tinyvit158.conform DUMP``.

The golden vectors (``weights/cifar10-tiny-int.golden.safetensors``) hold, for the shipped
integer model (``weights/cifar10-tiny-int.safetensors``) and the first 16 CIFAR-10 test
images:

- ``input``: int32 [16, 3, 32, 32], the preprocessed images in Q16 (``docs/FORMAT.md``
  7.5, "Input"): every implementation starts from these integers;
- ``logits``: int64 [16, 10], the Q16 logits;
- the values of chosen steps for image 0 (``step.<stage>``: the patch embedding's output,
  block 0's probability codes, proj and fc2 outputs, and the residual stream after it);
- ``trace_sha256``: uint8 [16, 32], each image's SHA-256 over its whole trace (every stage
  of :class:`~tinyvit158.integer.IntegerOracle`, in the order computed, each as int64
  little-endian, C order).

A DUMP is a safetensors file of the other implementation's ``logits`` (int64 [16, 10]) for
the golden inputs, and optionally any ``step.<stage>`` tensors. ``conform DUMP`` says
whether they equal the golden ones, and where the first difference lies (the earliest
step, then the logits). ``conform --dump OUT`` writes this package's own dump (the
reference run on the golden inputs); ``--make-golden OUT --data DIR`` regenerates the
golden file from the test split. Exit status: 0 conforms, 1 differs or bad input, 2 usage.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from tinyvit158.cli import prog
from tinyvit158.data import data_arg, load_cifar10
from tinyvit158.engine import Engine
from tinyvit158.errors import TinyViTError
from tinyvit158.files import atomic_write_bytes, check_input, check_output
from tinyvit158.image import normalize
from tinyvit158.integer import FRAC, IntegerOracle, to_q16
from tinyvit158.weights import load_weights, shipped_path

GOLDEN_NAME = "cifar10-tiny-int.golden.safetensors"
MODEL_NAME = "cifar10-tiny-int.safetensors"
IMAGES = 16
STEPS = ("patch_embed", "blocks.0.attn.p", "blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.0")


def shipped(name: str) -> Path:
    """A shipped file (``weights.shipped_path``), or one TinyViTError."""
    path = shipped_path(name)
    if path is None:
        raise TinyViTError(f"{name}: not found beside this install (weights/ of the repository)")
    return path


class _TracedOracle(IntegerOracle):
    """The reference, keeping every stage of one image's run in order (for the hashes)."""

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.order: list[tuple[str, np.ndarray]] = []

    def _keep(self, stage, x):
        self.order.append((stage, np.asarray(x, np.int64)))
        return x


def run(model_file: Path, q16_images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The reference on Q16 inputs: (logits, steps of image 0, trace hashes [n, 32])."""
    oracle = _TracedOracle(load_weights(model_file))
    images = q16_images.astype(np.float64) / (1 << FRAC)  # exact; to_q16 gives the integers back
    logits, hashes, steps = [], [], {}
    for i, x in enumerate(images):
        oracle.order = []
        logits.append(oracle.integers(x[None])[0])
        h = hashlib.sha256()
        for stage, v in oracle.order:
            h.update(stage.encode())
            h.update(np.ascontiguousarray(v, "<i8").tobytes())
            if i == 0 and stage in STEPS:
                steps[f"step.{stage}"] = v[0].astype(np.uint8 if stage.endswith(".p") else np.int32)
        hashes.append(np.frombuffer(h.digest(), np.uint8))
    return np.stack(logits).astype(np.int64), steps, np.stack(hashes)


def run_engine(model_file: Path, q16_images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The fast engine on Q16 inputs: (logits, the steps of image 0 it keeps: all but the
    probabilities, which stay inside its attention kernel)."""
    engine = Engine(load_weights(model_file))
    engine.trace = {}
    logits = engine.integers((q16_images.astype(np.float64) / (1 << FRAC)).astype(np.float32))
    steps = {f"step.{s}": engine.trace[s][0].astype(np.int32) for s in STEPS if s in engine.trace}
    return logits, steps


def make_golden(out: Path, data: str) -> None:
    test = load_cifar10(data, "test", limit=IMAGES)
    model = shipped(MODEL_NAME)
    cfg = load_weights(model).config
    x = to_q16(np.stack([normalize(im, cfg) for im in test.images])).astype(np.int32)
    logits, steps, hashes = run(model, x)
    tensors = {"input": x, "logits": logits, "trace_sha256": hashes, **steps}
    atomic_write_bytes(out, safetensors.numpy.save(tensors, {"model": MODEL_NAME}), mode=0o666)


def read(path: str | Path) -> dict[str, np.ndarray]:
    check_input(path)
    try:
        return dict(safetensors.numpy.load_file(str(path)))
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise TinyViTError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def first_difference(golden: dict, dump: dict) -> str | None:
    """Where ``dump`` first differs from ``golden`` (the earliest step, then the logits), or None."""
    if "logits" not in dump:
        raise TinyViTError("the dump holds no 'logits' tensor (int64 [16, 10]: the Q16 logits)")
    names = [f"step.{s}" for s in STEPS if f"step.{s}" in dump] + ["logits"]
    for name in names:
        want, got = golden[name], dump[name]
        if got.shape != want.shape:
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        diff = np.argwhere(want.astype(np.int64) != got.astype(np.int64))
        if len(diff):
            at = tuple(int(i) for i in diff[0])
            return (f"{name}: {len(diff)} of {want.size} values differ; the first at index {at}: "
                    f"expected {int(want[at])}, found {int(got[at])}")  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("tinyvit158.conform"),
        description=__doc__.splitlines()[0],
        epilog="exit status: 0 conforms; 1 differs, or bad input; 2 usage error",
    )
    p.add_argument("dump", nargs="?", help="a safetensors file of another implementation's logits (and steps)")
    p.add_argument("--golden", help=f"the golden vectors (default: the shipped {GOLDEN_NAME})")
    p.add_argument("--dump", dest="write_dump", metavar="OUT", help="write this package's own dump to OUT")
    p.add_argument(
        "--engine", choices=("fast", "oracle"), default="fast",
        help="with --dump: the fast engine (default) or the int64 reference (every step)",
    )  # fmt: skip
    p.add_argument("--make-golden", metavar="OUT", help="regenerate the golden vectors from the test split (--data)")
    p.add_argument("--data", help="CIFAR-10 location, for --make-golden (default: $TINYVIT158_DATA)")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.dump, args.write_dump, args.make_golden)) != 1:
        p.error("give one of DUMP, --dump OUT or --make-golden OUT")
    try:
        if args.make_golden:
            make_golden(check_output(args.make_golden), data_arg(p, args.data))
            print(f"wrote {args.make_golden}")
            return 0
        golden = read(args.golden or shipped(GOLDEN_NAME))
        if args.write_dump:
            out = check_output(args.write_dump, [args.golden or shipped(GOLDEN_NAME)])
            model = shipped(MODEL_NAME)
            logits, steps = (
                run_engine(model, golden["input"]) if args.engine == "fast" else run(model, golden["input"])[:2]
            )
            atomic_write_bytes(out, safetensors.numpy.save({"logits": logits, **steps}), mode=0o666)
            print(f"wrote {out}")
            return 0
        where = first_difference(golden, read(args.dump))
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if where is not None:
        print(f"differs: {where}")
        return 1
    n = len(golden["logits"])
    print(f"conforms: the logits of all {n} golden images, and every step given, are equal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
