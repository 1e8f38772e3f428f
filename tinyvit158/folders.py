"""Image folders: the image files of a folder, and labelled folders ``ROOT/<class>/<image>``.

A labelled folder is ``ROOT/<class name>/<image>`` (ImageNet-val style); hidden files and
folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped. Its folder names are matched
to the model's ``class_names`` (or through a JSON ``--class-map`` from folder to class
name); a folder the model does not know, an empty one, a file where a folder
belongs, or no class folders at all are refused in one line.

Decoding and classifying the images is ``pipeline.py``'s work.
"""

from __future__ import annotations

import functools
import json
import os
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
