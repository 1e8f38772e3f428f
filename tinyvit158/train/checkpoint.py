"""Check that a trainer checkpoint loads safely, or re-save a trusted old one:
``python -m tinyvit158.train.checkpoint RUN/last.pt [--resave-trusted NEW.pt]``.

What "safely" means, and the rules a checkpoint follows, are ``train/state.py``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyvit158.cli import prog
from tinyvit158.errors import TinyViTError
from tinyvit158.train.state import load_checkpoint, resave_trusted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("tinyvit158.train.checkpoint"),
        description="Check that a trainer checkpoint loads safely (weights_only), or re-save a trusted old one.",
    )
    p.add_argument("checkpoint", help="a trainer checkpoint (.pt)")
    p.add_argument(
        "--resave-trusted", metavar="NEW", type=Path,
        help="load CHECKPOINT with the full unpickler (it can run code: only for a file you trust) and "
        "write it to NEW in the safe form",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        if args.resave_trusted:
            resave_trusted(args.checkpoint, args.resave_trusted)
            print(f"wrote {args.resave_trusted}")
        else:
            state = load_checkpoint(args.checkpoint)
            print(f"{args.checkpoint}: loads safely; keys {sorted(state)}")
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
