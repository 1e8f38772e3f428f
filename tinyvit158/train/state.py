"""Trainer checkpoints (``RUN/last.pt``, ``best.pt``, ``epoch-NNN.pt``): saved atomically,
loaded so that no file can run code.

A PyTorch checkpoint is a pickle, and unpickling can call any function the file names
(``os.system`` included). Every checkpoint the project reads goes through
:func:`load_checkpoint`, which uses ``torch.load(..., weights_only=True)``: PyTorch's
restricted unpickler, which rebuilds tensors and plain containers (dict, list, tuple,
str, int, float, bool, None) and refuses every other global before calling it. So a
checkpoint holds only such values: the recipe and config as dicts, the torch version as
a ``str`` (``torch.__version__`` is a ``str`` subclass the restricted unpickler refuses).

A checkpoint written before this rule (or by other code) that needs the full unpickler
is refused in one line saying why. If you trust the file, re-save it in the safe form:

    python -m tinyvit158.train.checkpoint OLD.pt --resave-trusted NEW.pt
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import torch

from tinyvit158.config import ViTConfig
from tinyvit158.errors import TinyViTError
from tinyvit158.files import atomic_path, check_output, input_problem
from tinyvit158.train.model import QATViT
from tinyvit158.weights import load_weights

RESAVE_HINT = "python -m tinyvit158.train.checkpoint {path} --resave-trusted NEW.pt"


def plain(obj):
    """``obj`` with ``str`` subclasses (``torch.__version__``), tuples and paths made plain
    ``str``/``list``: what ``weights_only=True`` loads back."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise TinyViTError(f"cannot store a {type(obj).__name__} in a checkpoint: only tensors and plain values")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` (plain values and tensors only) to ``path`` atomically
    (``files.atomic_path``: a temporary file in the same folder, then a rename), so a
    reader never sees half a file."""
    state = plain(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def is_safetensors(path: str | Path) -> bool:
    """Whether a file starts as a safetensors file does: a little-endian 8-byte header
    length, then the header's JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _torch_load(path: str | Path, device: str, weights_only: bool):
    """``torch.load`` of a checked regular file; missing, special and safetensors files,
    and the loader's I/O errors, are one TinyViTError."""
    problem = input_problem(path)
    if problem:
        raise TinyViTError(f"{path}: not a readable PyTorch checkpoint ({problem})")
    if is_safetensors(path):
        raise TinyViTError(
            f"{path}: a safetensors weight file, not a training checkpoint (.pt); "
            "it is what export writes: run it with predict or evaluate --weights"
        )
    try:
        return torch.load(path, map_location=device, weights_only=weights_only)
    except pickle.UnpicklingError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TinyViTError(f"{path}: not a readable PyTorch checkpoint ({why})") from None


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """The state dict of a checkpoint, loaded with ``weights_only=True`` (module docstring).

    Raises TinyViTError in one line for a missing, truncated or unsafe file."""
    try:
        state = _torch_load(path, device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if not found:  # not a pickle the safe loader understands (e.g. junk read as the legacy format)
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            why = detail.group(1).strip() if detail else str(e).strip()[:80]
            raise TinyViTError(f"{path}: not a readable PyTorch checkpoint ({why})") from None
        raise TinyViTError(
            f"{path}: refused: loading it needs Python's full unpickler, which can run code from the file"
            f" (it names {found.group(1)}); if you trust it, re-save it safely: " + RESAVE_HINT.format(path=path)
        ) from None
    if not isinstance(state, dict):
        raise TinyViTError(f"{path}: not a tinyvit158 training checkpoint (a {type(state).__name__}, not a dict)")
    return state


def ended_in_float(state: dict) -> bool:
    """Whether a trainer checkpoint's last epoch ran in float (a float run, or its float stage)."""
    return not state.get("log", {}).get("quantized", True)


def model_from_state(state: dict, path: str | Path, device: str = "cpu", as_trained: bool = False) -> QATViT:
    """The model of a loaded trainer checkpoint, in eval mode: quantization on, or with
    ``as_trained`` as its last epoch ran (a float run stays float)."""
    try:
        cfg = ViTConfig.from_dict(state["config"])
        model = QATViT(cfg).to(device)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise TinyViTError(f"{path}: not a tinyvit158 training checkpoint ({str(e).splitlines()[0]})") from None
    model.set_quantize(not (as_trained and ended_in_float(state)))
    model.eval()
    return model


def load_run(path: str | Path, device: str = "cpu", as_trained: bool = False) -> tuple[QATViT, dict]:
    """The model of a trainer checkpoint (:func:`model_from_state`) and the raw state."""
    state = load_checkpoint(path, device)
    return model_from_state(state, path, device, as_trained), state


def resave_trusted(src: str | Path, dst: str | Path) -> None:
    """Load ``src`` with the full unpickler (only for a file you trust) and write it to
    ``dst`` in the safe form."""
    check_output(dst, [src], "--resave-trusted")
    try:
        state = _torch_load(src, "cpu", weights_only=False)
    except pickle.UnpicklingError as e:
        raise TinyViTError(f"{src}: not a readable PyTorch checkpoint ({str(e).strip()[:80]})") from None
    if not isinstance(state, dict):
        raise TinyViTError(f"{src}: not a tinyvit158 training checkpoint (a {type(state).__name__})")
    save_checkpoint(state, dst)


def load_torch_twin(checkpoint: str | Path) -> QATViT:
    """The PyTorch model of a weight file (its twin: the same function) or of a trainer
    checkpoint as its run ended (a float run stays float, and says so on stderr)."""
    if str(checkpoint).endswith(".safetensors"):
        return QATViT.from_checkpoint(load_weights(checkpoint))
    model, state = load_run(checkpoint, as_trained=True)
    if ended_in_float(state):
        print(f"{checkpoint}: a float model (its run ended in float): compared as it is, in float32", file=sys.stderr)
    return model
