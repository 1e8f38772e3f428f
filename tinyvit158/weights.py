"""The weight file: one ``.safetensors`` file holds one model, its config and its story.

The format, byte by byte and tensor by tensor, with the arithmetic of every layer, is
specified in ``docs/FORMAT.md``; this module reads, validates and writes it.

Layout (docs/FORMAT.md gives it byte by byte)
----------------------------
metadata (str -> str):
    format          "tinyvit158"     the magic: anything else is not our file
    format_version  "1"              bumped on any incompatible change
    config          ViTConfig as JSON (shapes, packing, numerics, class names, mean/std)
    source          JSON: how the weights were made (recipe, data, accuracy, ...)
tensors (timm ViT names):
    <layer>.weight_packed  uint8 (out, ceil(in / 4 or 5))   ternary layers, see packing.py
    <layer>.weight_scale   float32 (out,)                    gamma per output channel
    <layer>.weight         float32                           float layers (timm shapes)
    <layer>.bias           float32 (out,)
    <layer>.norm.weight/.bias                                 only with bitlinear_norm
    blocks.{i}.attn.q_norm/k_norm.weight/.bias (head_dim,)    only with qk_norm
    cls_token (1, 1, dim), pos_embed (1, tokens, dim), blocks.{i}.norm1/norm2, norm, head

Files are parsed by the ``safetensors`` package (bounded header, checked offsets, no code
execution) and then validated completely: every failure is one WeightFileError naming
the file and the tensor. Writing goes to a temporary file that is renamed into place,
so a failed or interrupted write leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from tinyvit158.config import BLOCK_NORMS, ViTConfig
from tinyvit158.errors import TinyViTError, WeightFileError
from tinyvit158.files import atomic_write_bytes, input_problem
from tinyvit158.packing import pack, packed_cols, unpack
from tinyvit158.quant import ternarize

FORMAT_NAME = "tinyvit158"
FORMAT_VERSION = "1"


def tensor_spec(cfg: ViTConfig) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every tensor a weight file of this config holds: ``{name: (dtype, shape)}``."""
    f32, u8 = np.dtype(np.float32), np.dtype(np.uint8)
    spec: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
        "cls_token": (f32, (1, 1, cfg.dim)),
        "pos_embed": (f32, (1, cfg.num_tokens, cfg.dim)),
    }
    for layer, (n, k) in cfg.linear_shapes().items():
        if cfg.is_ternary(layer):
            spec[f"{layer}.weight_packed"] = (u8, (n, packed_cols(k, cfg.packing)))
            spec[f"{layer}.weight_scale"] = (f32, (n,))
            if cfg.bitlinear_norm:
                spec[f"{layer}.norm.weight"] = (f32, (k,))
                spec[f"{layer}.norm.bias"] = (f32, (k,))
        elif layer == "patch_embed.proj":  # a float conv, timm's shape
            spec[f"{layer}.weight"] = (f32, (n, cfg.in_chans, cfg.patch_size, cfg.patch_size))
        else:
            spec[f"{layer}.weight"] = (f32, (n, k))
        if cfg.has_bias(layer):
            spec[f"{layer}.bias"] = (f32, (n,))
    for name in [f"blocks.{i}.{norm}" for i in range(cfg.depth) for norm in BLOCK_NORMS] + ["norm"]:
        spec[f"{name}.weight"] = (f32, (cfg.dim,))
        spec[f"{name}.bias"] = (f32, (cfg.dim,))
    if cfg.qk_norm:
        for name in [f"blocks.{i}.attn.{qk}_norm" for i in range(cfg.depth) for qk in "qk"]:
            spec[f"{name}.weight"] = (f32, (cfg.head_dim,))
            spec[f"{name}.bias"] = (f32, (cfg.head_dim,))
    return spec


@dataclass
class Checkpoint:
    """A validated model: config, named tensors (NumPy), and how it was made."""

    config: ViTConfig
    tensors: dict[str, np.ndarray]
    source: dict[str, Any] = field(default_factory=dict)

    def ternary(self, layer: str):
        """``(codes int8 (out, in), scale float32 (out,), bias float32 or None)`` of a ternary layer."""
        n, k = self.config.linear_shapes()[layer]
        codes = unpack(self.tensors[f"{layer}.weight_packed"], k, self.config.packing)
        return codes, self.tensors[f"{layer}.weight_scale"], self.tensors.get(f"{layer}.bias")

    def dequantized(self, layer: str) -> np.ndarray:
        """A ternary layer's weight as float32 ``codes x gamma`` (out, in): its function in float."""
        codes, gamma, _ = self.ternary(layer)
        return codes.astype(np.float32) * gamma[:, None]

    def float_weight(self, layer: str) -> np.ndarray:
        """A float layer's weight as a 2-D (out, in) matrix (a conv weight is flattened c, row, col)."""
        w = self.tensors[f"{layer}.weight"]
        return w.reshape(w.shape[0], -1)


def _error(path, tensor: str | None, what: str) -> WeightFileError:
    where = f"{path}" + (f", tensor {tensor!r}" if tensor else "")
    return WeightFileError(f"{where}: {what}")


def validate(cfg: ViTConfig, tensors: dict[str, np.ndarray], path: str | os.PathLike = "<memory>") -> None:
    """Check tensors against the config: names, dtypes, shapes, packed codes, finite values."""
    spec = tensor_spec(cfg)
    missing = [n for n in spec if n not in tensors]
    if missing:
        raise _error(
            path, missing[0], f"missing ({len(missing)} tensor(s) missing); the file does not match its config"
        )
    extra = sorted(set(tensors) - set(spec))
    if extra:
        raise _error(path, extra[0], f"unexpected tensor ({len(extra)} extra); the file does not match its config")
    for name, (dtype, shape) in spec.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise _error(path, name, f"dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != shape:
            raise _error(path, name, f"shape {tuple(t.shape)}, expected {shape} for config {cfg.name!r}")
        if name.endswith(".weight_packed"):
            layer = name[: -len(".weight_packed")]
            try:
                unpack(t, cfg.linear_shapes()[layer][1], cfg.packing)
            except TinyViTError as e:
                raise _error(path, name, str(e)) from None
        elif not np.all(np.isfinite(t)):
            raise _error(path, name, "holds NaN or infinite values")
        if name.endswith(".weight_scale"):
            if np.any(t < 0):
                raise _error(path, name, "holds negative scales; gamma = mean(|W|) is never negative")
            if cfg.scale_granularity == "tensor" and np.any(t != t[0]):
                raise _error(path, name, "per-tensor scale expected (scale_granularity='tensor') but values differ")


def serialize(ckpt: Checkpoint) -> bytes:
    """The bytes of ``ckpt``'s weight file (what :func:`save_weights` writes)."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_json(),
        "source": json.dumps(ckpt.source, sort_keys=True),
    }
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in ckpt.tensors.items()}, metadata)


def save_weights(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Validate and write a weight file atomically (``files.atomic_path``: a temporary file
    in the same folder, then a rename), readable by all as a file for sharing is."""
    validate(ckpt.config, ckpt.tensors, path)
    atomic_write_bytes(path, serialize(ckpt), mode=0o666)


def load_weights(path: str | os.PathLike) -> Checkpoint:
    """Read and fully validate a weight file; any problem is one WeightFileError."""
    path = Path(path)
    problem = input_problem(path)
    if problem == "is an empty file":
        raise _error(path, None, f"not a readable safetensors file ({problem[3:]}); re-download or re-export it")
    if problem:
        raise _error(path, None, "no such weight file" if problem == "no such file" else problem)
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(path, None, f"not a readable safetensors file ({msg}); re-download or re-export it") from None

    if metadata.get("format") != FORMAT_NAME:
        raise _error(
            path, None,
            f"metadata format is {metadata.get('format')!r}, expected {FORMAT_NAME!r}; "
            "HINT: convert a float checkpoint with tinyvit158's exporter first",
        )  # fmt: skip
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _error(
            path, None,
            f"format_version is {metadata.get('format_version')!r}, this tinyvit158 reads {FORMAT_VERSION!r}; "
            "HINT: use the tinyvit158 version that wrote it, or re-export the weights",
        )  # fmt: skip
    try:
        cfg = ViTConfig.from_json(metadata.get("config", ""))
    except TinyViTError as e:
        raise _error(path, None, f"bad config metadata: {e}") from None
    try:
        source = json.loads(metadata.get("source", "{}"))
    except json.JSONDecodeError as e:
        raise _error(path, None, f"source metadata is not JSON ({e})") from None
    validate(cfg, tensors, path)
    return Checkpoint(cfg, tensors, source if isinstance(source, dict) else {"text": source})


def random_checkpoint(cfg: ViTConfig, seed: int = 0) -> Checkpoint:
    """A random but valid ternary model of any config, for tests, notebooks and benchmarks.

    Float weights are drawn with std 1/sqrt(in_features) (so activations keep their size),
    then ternarized and packed exactly as an exporter would.
    """
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors: dict[str, np.ndarray] = {}
    for name, (_dtype, shape) in tensor_spec(cfg).items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight_packed"):
            n, k = cfg.linear_shapes()[layer]
            codes, scale = ternarize(normal((n, k), k**-0.5), cfg.scale_granularity)

            tensors[name] = pack(codes, cfg.packing)
            tensors[f"{layer}.weight_scale"] = scale
        elif name.endswith(".weight_scale"):
            continue  # written with its packed weights
        elif name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
            tensors[name] = (1.0 + normal(shape, 0.1)).astype(np.float32)
        elif name.endswith(".weight"):
            tensors[name] = normal(shape, int(np.prod(shape[1:])) ** -0.5)
        elif name in ("cls_token", "pos_embed"):
            tensors[name] = normal(shape, 0.5)
        else:  # biases
            tensors[name] = normal(shape, 0.05)
    # restore the spec's order (scales were inserted beside their packed weights)
    tensors = {name: tensors[name] for name in tensor_spec(cfg)}
    return Checkpoint(cfg, tensors, {"recipe": "random", "seed": seed})


DEFAULT_WEIGHTS_NAME = "cifar10-tiny.safetensors"  # the shipped float-numerics model (bench, size table)
# what predict and evaluate run without --weights: the same model in integer numerics, within
# the test split's noise of it and the same integers in every implementation
DEFAULT_MODEL_NAME = "cifar10-tiny-int.safetensors"


def _shipped_folders(kind: str) -> list[Path]:
    """Where shipped ``kind`` files ("weights", "examples") are: inside an installed wheel
    (``tinyvit158/_<kind>``), then the repository's ``<kind>/``; those that exist."""
    here = Path(__file__).resolve().parent
    return [folder for folder in (here / f"_{kind}", here.parent / kind) if folder.is_dir()]


def shipped_path(name: str) -> Path | None:
    """A shipped file: inside an installed wheel, else the repository's ``weights/``; None if neither."""
    return next((f / name for f in _shipped_folders("weights") if (f / name).is_file()), None)


def shipped_weight_files() -> list[Path]:
    """Every shipped weight file, sorted by name (golden vectors are not weight files)."""
    folders = _shipped_folders("weights")
    files = folders[0].glob("*.safetensors") if folders else []
    return sorted(p for p in files if not p.name.endswith(".golden.safetensors"))


def shipped_examples() -> list[Path]:
    """The example CIFAR-10 test images shipped with the package (the repository's
    ``examples/``; ``examples/CREDITS.md`` credits them), sorted by name."""
    folders = _shipped_folders("examples")
    return sorted(folders[0].glob("*.jpg")) if folders else []


def shipped_example(name: str) -> Path:
    """The shipped example image ``name`` (``"cat"``: ``examples/cat.jpg``)."""
    for path in shipped_examples():
        if path.stem == name:
            return path
    names = ", ".join(p.stem for p in shipped_examples()) or "none (reinstall tinyvit158)"
    raise TinyViTError(f"no shipped example image {name!r}; there are: {names}")


def default_weights_path() -> Path | None:
    """The shipped trained weights in float numerics (:func:`shipped_path`): the model the
    bench and the size table describe."""
    return shipped_path(DEFAULT_WEIGHTS_NAME)


def default_model_path() -> Path | None:
    """What ``predict`` and ``evaluate`` run without ``--weights``: the shipped integer-numerics
    file, else (a build without it) :func:`default_weights_path`."""
    return shipped_path(DEFAULT_MODEL_NAME) or default_weights_path()


def size_summary(ckpt: Checkpoint) -> dict[str, int]:
    """Bytes of a checkpoint's tensors, split by kind, and what float32 would take.

    ``packed``: the bit-packed ternary weights; ``float32_replaced``: the float32 weights
    they stand for (out x in x 4 bytes); ``scales``: their float32 scales; ``other``: every
    other tensor (norms, biases, embeddings, float layers), stored as float32 anyway.
    """
    cfg = ckpt.config
    shapes = cfg.linear_shapes()
    out = {"packed": 0, "float32_replaced": 0, "scales": 0, "other": 0}
    for name, t in ckpt.tensors.items():
        if name.endswith(".weight_packed"):
            n, k = shapes[name[: -len(".weight_packed")]]
            out["packed"] += t.nbytes
            out["float32_replaced"] += 4 * n * k
        elif name.endswith(".weight_scale"):
            out["scales"] += t.nbytes
        else:
            out["other"] += t.nbytes
    out["total"] = out["packed"] + out["scales"] + out["other"]
    out["float32_total"] = out["float32_replaced"] + out["other"]
    return out


def size_table(ckpt: Checkpoint, path: str | os.PathLike | None = None) -> list[dict[str, float | int | str]]:
    """The sizes every document quotes, for ``ckpt`` stored both ways (``ternary2`` and
    ``ternary3``): the weight file's bytes (``path``'s own size for its packing, else the
    serialized bytes), the packed ternary weights' bytes, and each against float32 (the
    float32 weights they replace; the float32 model: those plus every other tensor, as
    :func:`size_summary` counts)."""
    rows = []
    for packing in ("ternary2", "ternary3"):
        tensors = dict(ckpt.tensors)
        if packing != ckpt.config.packing:
            for layer in ckpt.config.linear_shapes():
                if ckpt.config.is_ternary(layer):
                    tensors[f"{layer}.weight_packed"] = pack(ckpt.ternary(layer)[0], packing)
        other = Checkpoint(ckpt.config.replace(packing=packing), tensors, ckpt.source)
        s = size_summary(other)
        own = path is not None and packing == ckpt.config.packing
        file_bytes = Path(path).stat().st_size if own else len(serialize(other))
        rows.append({
            "packing": packing, "file_bytes": file_bytes, "packed_bytes": s["packed"],
            "float32_replaced_bytes": s["float32_replaced"], "float32_model_bytes": s["float32_total"],
            "packed_vs_float32": s["float32_replaced"] / s["packed"],
            "file_vs_float32": s["float32_total"] / file_bytes,
        })  # fmt: skip
    return rows


def format_size_table(rows: list[dict]) -> str:
    """:func:`size_table` as the markdown table the README and the model card show."""
    lines = [
        "| storage | weight file | packed ternary weights | vs the float32 weights they replace "
        "| file vs float32 model |",
        "|---|---|---|---|---|",
        f"| float32 | {rows[0]['float32_model_bytes']:,} B | {rows[0]['float32_replaced_bytes']:,} B | 1 | 1 |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['packing']}` | {r['file_bytes']:,} B | {r['packed_bytes']:,} B | 1/{r['packed_vs_float32']:.1f} "
            f"| 1/{r['file_vs_float32']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m tinyvit158.weights [FILE]``: the size table of a weight file (default: the shipped one)."""
    p = argparse.ArgumentParser(
        prog="python -m tinyvit158.weights",
        description="The size table of a weight file: its bytes stored as 2-bit and base-3 packed ternary "
        "weights, against float32.",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="a tinyvit158 weight file (default: the shipped one)")
    args = p.parse_args(argv)
    path = args.file or default_weights_path()
    if path is None:
        print("error: no weight file given and none is shipped with this install", file=sys.stderr)
        return 1
    try:
        print(format_size_table(size_table(load_weights(path), path)))
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
