"""``tinyvit158 COMMAND ...``: one entry point for the tools (each also runs as ``python -m tinyvit158.COMMAND``)."""

from __future__ import annotations

import sys

COMMANDS = {
    "predict": "classify images",
    "evaluate": "accuracy on CIFAR-10",
    "bench": "speed and memory against NumPy and PyTorch",
    "convert": "a weight file with other numerics (e.g. int8 attention)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: tinyvit158 {" + ",".join(COMMANDS) + "} [options]\n", file=sys.stderr if argv else sys.stdout)
        for name, what in COMMANDS.items():
            print(f"  {name:<9} {what} (tinyvit158 {name} --help)", file=sys.stderr if argv else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    import importlib

    return importlib.import_module(f"tinyvit158.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
