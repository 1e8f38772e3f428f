"""Labelled image folders and streaming: decode many images in worker processes, in order,
with bounded memory.

A labelled folder is ``ROOT/<class name>/<image>`` (ImageNet-val style); hidden files and
folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped. Its folder names are matched
to the model's ``class_names`` (or through a JSON ``--class-map`` from folder to class
name); a folder the model does not know, an empty one, a file where a folder
belongs, or no class folders at all are refused in one line.

:func:`stream` decodes (``image.load_image``: draft-mode JPEG, resize, normalize) in a pool
of worker processes and yields batches in file order. At most two windows of
``workers x 4`` batches are in flight, so memory stays flat however many files there are.
:func:`classify` runs the engine on them, or hands the whole job to Ray (``cluster.py``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyvit158.config import ViTConfig
from tinyvit158.errors import TinyViTError
from tinyvit158.files import input_problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}


def visible_entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted, without the hidden ones (``.DS_Store``, ``.ipynb_checkpoints``,
    macOS's ``._name`` files), as torchvision's ``ImageFolder`` skips them."""
    return sorted(e for e in folder.iterdir() if not e.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside a folder (by suffix; hidden ones skipped), sorted."""
    return [f for f in visible_entries(folder) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]


class FolderError(TinyViTError):
    """A labelled folder that does not fit the model."""


@dataclass
class LabelledFolder:
    root: Path
    paths: list[Path]
    labels: np.ndarray  # int64, the model's class index of each path

    @functools.cached_property
    def names(self) -> list[str]:
        """Each image's path under the root (``cat/0001.jpg``); computed once."""
        return [str(p.relative_to(self.root)) for p in self.paths]


def is_labelled_folder(path: str | os.PathLike) -> bool:
    """A folder of class folders, not one of the CIFAR-10 layouts (``test/`` or ``train/``
    of class folders, the zips, the tarball, the python batches)."""
    p = Path(path)
    if not p.is_dir():
        return False
    cifar = ("test", "train", "cifar-10-batches-py", "cifar-10-python.tar.gz", "data_batch_1")
    return not any((p / n).exists() for n in cifar) and not any(p.glob("cifar10-*-jpg.zip"))


def load_labelled_folder(root: str | os.PathLike, cfg: ViTConfig, class_map: str | None = None) -> LabelledFolder:
    """The images under ``root``'s class folders, with the model's class index of each."""
    root = Path(root)
    mapping = _read_class_map(class_map) if class_map else {}
    entries = visible_entries(root)
    files = [e for e in entries if not e.is_dir()]
    if files:
        raise FolderError(
            f"{root}: a file where a class folder belongs: {files[0].name} (expected {root}/<class>/<image>)"
        )
    if not entries:
        raise FolderError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    index = {name: i for i, name in enumerate(cfg.class_names)}
    paths, labels = [], []
    for folder in entries:
        name = mapping.get(folder.name, folder.name)
        if name not in index:
            known = ", ".join(cfg.class_names[:12]) + (", ..." if len(cfg.class_names) > 12 else "")
            raise FolderError(
                f"{folder}: class folder {folder.name!r} is not one of the model's classes ({known}); "
                "rename it or give --class-map FILE (JSON: folder -> class)"
            )
        images = image_files(folder)
        if not images:
            raise FolderError(f"{folder}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += images
        labels += [index[name]] * len(images)
    return LabelledFolder(root, paths, np.array(labels, dtype=np.int64))


def _read_class_map(path: str) -> dict[str, str]:
    problem = input_problem(path)
    if problem:
        raise FolderError(f"{path}: {problem} (--class-map takes a JSON file)")
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FolderError(f"{path}: not a readable JSON class map ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise FolderError(f"{path}: a class map is a JSON object of folder name -> class name")
    return mapping


def usable_workers(workers: int) -> int:
    """``workers`` decoding processes, at most one a CPU this process may run on (said on
    stderr when fewer than asked): more only add memory."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if workers > cpus:
        print(f"note: --workers {workers} is more than the {cpus} CPUs here; using {cpus}", file=sys.stderr)
        return cpus
    return workers


_CFG: ViTConfig | None = None  # the config a worker process decodes for


def _init(cfg: ViTConfig) -> None:
    global _CFG
    _CFG = cfg


def decode(path, cfg: ViTConfig) -> np.ndarray | str:
    """One image as the model takes it, or its one-line error."""
    from tinyvit158.image import load_image

    try:
        return load_image(path, cfg)
    except TinyViTError as e:
        return str(e)


def _decode(path) -> np.ndarray | str:
    """:func:`decode` in a worker process, for the config it was started with."""
    return decode(path, _CFG)


def stream(paths: list, cfg: ViTConfig, batch: int, workers: int = 1) -> Iterator[tuple[list[int], np.ndarray, dict]]:
    """Batches ``(indices, images (n, C, S, S) float32, {index: error})`` in file order.
    ``workers`` > 1 decodes in that many processes; at most two windows of ``4 x workers``
    batches are decoded ahead of the consumer."""
    window = batch * 4 * max(workers, 1)
    starts = range(0, len(paths), window)
    if workers <= 1:
        _init(cfg)
        for s in starts:
            yield from _batches(s, [_decode(p) for p in paths[s : s + window]], batch, cfg)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(cfg,)) as pool:
        pending = None
        for s in starts:
            job = pool.map_async(_decode, paths[s : s + window], chunksize=max(1, batch // 4))
            if pending is not None:
                yield from _batches(pending[0], pending[1].get(), batch, cfg)
            pending = (s, job)
        if pending is not None:
            yield from _batches(pending[0], pending[1].get(), batch, cfg)


def make_model(ckpt, engine: str = "fast"):
    """The fast ``Engine`` or the float64 ``Oracle`` of a checkpoint."""
    if engine == "fast":
        from tinyvit158.engine import Engine

        return Engine(ckpt)
    from tinyvit158.oracle import Oracle

    return Oracle(ckpt)


def classify(
    paths: list,
    ckpt,
    batch: int,
    workers: int = 1,
    engine: str = "fast",
    ray: str | None = None,
    actors: int = 1,
    explain: bool = False,
    ray_timeout: float = 30.0,
) -> Iterator[tuple[list[int], np.ndarray, dict, dict | None]]:
    """Batches ``(indices, logits of the good images, {index: error}, record)`` in file order:
    decoded in ``workers`` processes (:func:`stream`) and run here by the ``engine`` ("fast"
    or "oracle"), or all of it on Ray (``ray``: "" a local instance, else a cluster address;
    ``actors`` engines, ``ray_timeout`` seconds to reach a cluster; ``cluster.py``).
    ``record``: with ``explain``, the codes of the first batch that holds an image (for the
    ledger), else None."""
    if ray is not None:
        from tinyvit158.cluster import ray_stream

        for idx, logits, errors in ray_stream(paths, ckpt, batch, actors, ray or None, ray_timeout):
            yield idx, logits, errors, None
        return
    from tinyvit158.engine import first_run_notice

    model = make_model(ckpt, engine)
    if explain and engine == "fast":
        model.record = {}  # the first batch's codes, for the ledger
    for idx, images, errors in stream(paths, ckpt.config, batch, workers):
        record = None
        logits = np.zeros((0, ckpt.config.num_classes), np.float32)
        if len(images):
            with first_run_notice():
                logits = model(images)
            if getattr(model, "record", None) is not None:
                record, model.record = model.record, None
        yield idx, logits, errors, record


def _batches(start: int, decoded: list, batch: int, cfg: ViTConfig):
    for b in range(0, len(decoded), batch):
        part = decoded[b : b + batch]
        idx = [start + b + i for i in range(len(part))]
        errors = {i: d for i, d in zip(idx, part, strict=True) if isinstance(d, str)}
        good = [d for d in part if not isinstance(d, str)]
        shape = (0, cfg.in_chans, cfg.image_size, cfg.image_size)
        yield idx, (np.stack(good) if good else np.zeros(shape, np.float32)), errors
