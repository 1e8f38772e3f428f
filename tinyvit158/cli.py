"""``tinyvit158 COMMAND ...``: one entry point for the tools (each also runs as ``python -m MODULE``).

``tinyvit158 --version`` prints the version; ``tinyvit158 help`` (or no command) lists the
commands; ``tinyvit158 COMMAND --help`` explains one.
"""

from __future__ import annotations

import sys

# command -> (module, what it does); train, teacher, export, average and checkpoint need the train extra
COMMANDS = {
    "predict": ("tinyvit158.predict", "classify images"),
    "evaluate": ("tinyvit158.evaluate", "accuracy, per-class accuracy and confusion matrix on CIFAR-10"),
    "bench": ("tinyvit158.bench", "speed and memory against NumPy, PyTorch, ONNX Runtime and OpenVINO"),
    "convert": ("tinyvit158.convert", "a weight file with other numerics (e.g. int8 attention)"),
    "conform": ("tinyvit158.conform", "check another integer-numerics implementation against the golden vectors"),
    "train": ("tinyvit158.train.trainer", "quantization-aware training on CIFAR-10 (train extra)"),
    "teacher": ("tinyvit158.train.teacher", "a convolutional teacher for distillation (train extra)"),
    "export": ("tinyvit158.train.export", "a trainer checkpoint to a weight file (train extra)"),
    "average": ("tinyvit158.train.average", "average the weights of a run's last epochs (train extra)"),
    "checkpoint": ("tinyvit158.train.checkpoint", "check or re-save a trainer checkpoint safely (train extra)"),
}
_via: str | None = None  # the command's name while it runs as ``tinyvit158 NAME``


def prog(module: str) -> str:
    """A command's name for its usage line: ``tinyvit158 NAME`` or ``python -m MODULE``."""
    return f"tinyvit158 {_via}" if _via else f"python -m {module}"


def usage() -> str:
    lines = ["usage: tinyvit158 {" + ",".join(COMMANDS) + "} [options]", "       tinyvit158 --version", ""]
    lines += [f"  {name:<11} {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "tinyvit158 COMMAND --help explains one; each also runs as python -m MODULE."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global _via
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        from tinyvit158 import __version__

        print(f"tinyvit158 {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    module, _ = COMMANDS[argv[0]]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:  # torch for the training commands
        print(f"error: tinyvit158 {argv[0]} needs {e.name}: pip install -e '.[train]'", file=sys.stderr)
        return 1
    _via = argv[0]
    try:
        return mod.main(argv[1:])
    finally:
        _via = None


if __name__ == "__main__":
    raise SystemExit(main())
