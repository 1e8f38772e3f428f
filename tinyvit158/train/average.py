"""Average the weights of a run's last epochs (stochastic weight averaging).

``python -m tinyvit158.train.average RUN/epoch-*.pt --out RUN/average.pt [--data PATH]``

The latent float weights of a run's last epochs (``--snapshots K`` saves them as
``RUN/epoch-NNN.pt``), averaged, tend to lie in a flatter region of the loss than any one
of them (Izmailov et al. 2018, "Averaging weights leads to wider optima"); the exporter
then ternarizes the average like any checkpoint. There are no batch statistics to
recompute (a ViT has only LayerNorms). With ``--data`` it prints the held-out accuracy
(the 5,000 training images the run never trained on) of every input and of the average,
so that the choice between them is made on held-out data, never on the test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tinyvit158.cli import prog
from tinyvit158.config import ViTConfig
from tinyvit158.data import load_cifar10, split_holdout
from tinyvit158.errors import TinyViTError
from tinyvit158.files import check_output
from tinyvit158.train.model import QATViT, evaluate
from tinyvit158.train.state import load_run, save_checkpoint


def load_states(paths: list[str | Path]) -> list[dict]:
    """The trainer checkpoints to average, checked to share one architecture."""
    if not paths:
        raise TinyViTError("no checkpoints to average")
    states = []
    for path in paths:
        _, state = load_run(path)  # checks that it is a trainer checkpoint
        if states and state["config"] != states[0]["config"]:
            raise TinyViTError(f"{path}: another architecture than {paths[0]}")
        states.append(state)
    return states


def average_states(states: list[dict], names: list[str]) -> dict:
    """A checkpoint (like ``best.pt``) whose model is the mean of the given checkpoints' models."""
    model = {
        k: torch.stack([s["model"][k].float() for s in states]).mean(0).to(v.dtype)
        for k, v in states[0]["model"].items()
    }
    last = max(states, key=lambda s: s.get("epoch") if isinstance(s.get("epoch"), int) else -1)
    out = {k: v for k, v in last.items() if k not in ("optimizer", "model")}
    out["model"] = model
    out["averaged"] = [f"{Path(n).name} (epoch {s.get('epoch', '?')})" for n, s in zip(names, states, strict=True)]
    out["log"] = {"quantized": True}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("tinyvit158.train.average"), description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="trainer checkpoints of one run (RUN/epoch-NNN.pt)")
    p.add_argument("--out", required=True, type=Path, help="the averaged checkpoint to write")
    p.add_argument("--data", help="CIFAR-10 location: held-out accuracy of the inputs and the average")
    p.add_argument("--device", default="cpu", help="where to measure the held-out accuracy: cpu or cuda")
    args = p.parse_args(argv)
    try:
        check_output(args.out, args.checkpoints)
        states = load_states(args.checkpoints)
        state = average_states(states, args.checkpoints)
        if args.data:
            data = load_cifar10(args.data, "train", progress=True)
            recipe = state.get("recipe") or {}
            if not isinstance(recipe.get("holdout"), int) or not isinstance(recipe.get("seed"), int):
                raise TinyViTError(f"{args.checkpoints[-1]}: no recipe with its held-out split; average without --data")
            _, val_idx = split_holdout(data.labels, recipe["holdout"], recipe["seed"])
            model = QATViT(ViTConfig.from_dict(state["config"])).to(args.device).eval()  # each input's weights in turn
            for path, one in zip(args.checkpoints, states, strict=True):
                model.load_state_dict(one["model"])
                print(f"{path}: held-out accuracy {evaluate(model, data, val_idx, args.device)['acc']:.4f}")
            model.load_state_dict(state["model"])
            state["log"]["val_acc"] = evaluate(model, data, val_idx, args.device)["acc"]
            print(f"average of {len(args.checkpoints)}: held-out accuracy {state['log']['val_acc']:.4f}")
        save_checkpoint(state, args.out)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
