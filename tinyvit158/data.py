"""CIFAR-10 readers (NumPy and Pillow only).

Accepted layouts, for ``split`` in {"train", "test"}:

- the JPEG zips of ../shared/data: ``cifar10-<split>-jpg.zip`` holding ``<split>/<class>/NNNN.jpg``,
  given as the zip itself or as the folder that holds it (``TINYVIT158_DATA``);
- an extracted copy: a folder holding ``<split>/<class>/*.jpg`` (or ``<class>/*.jpg``);
- the official python release: ``cifar-10-python.tar.gz`` (or the folder holding it), or
  its extracted ``cifar-10-batches-py`` folder. Its batches are Python pickles; they are
  read with an unpickler that can build only dicts, lists, strings, numbers and NumPy
  uint8 arrays, so a crafted file cannot run code.

Images come back as uint8 ``[N, 32, 32, 3]`` with int64 labels in the canonical class order.
Folder layouts are read in an order that interleaves the classes (every class's first
image, then every class's second, ...), so ``limit`` takes a balanced sample.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tinyvit158.config import CIFAR10_CLASSES
from tinyvit158.errors import TinyViTError
from tinyvit158.files import input_problem


class DataError(TinyViTError):
    """A data set path or layout that cannot be read."""


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,)
    names: list[str]  # where each image came from
    classes: tuple[str, ...] = CIFAR10_CLASSES

    def __len__(self) -> int:
        return len(self.labels)


SPLITS = ("train", "test")
TARBALL = "cifar-10-python.tar.gz"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _interleave(entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Sort by (rank within class, class), so any prefix is balanced across classes."""
    by_class: dict[int, list[str]] = {}
    for name, label in entries:
        by_class.setdefault(label, []).append(name)
    ranked = [(i, label, name) for label, names in by_class.items() for i, name in enumerate(sorted(names))]
    return [(name, label) for _, label, name in sorted(ranked)]


def _class_entries(names: list[str], where: str, strip: str) -> list[tuple[str, int]]:
    """``<strip><class>/<file>.jpg`` names -> (name, label); every class folder must be present."""
    entries, seen = [], set()
    for n in names:
        rel = n[len(strip) :] if n.startswith(strip) else None
        if not rel or not rel.lower().endswith((".jpg", ".jpeg", ".png")) or rel.count("/") != 1:
            continue
        cls = rel.split("/")[0]
        if cls not in CIFAR10_CLASSES:
            raise DataError(f"{where}: unknown class folder {cls!r}; expected the CIFAR-10 classes")
        seen.add(cls)
        entries.append((n, CIFAR10_CLASSES.index(cls)))
    missing = [c for c in CIFAR10_CLASSES if c not in seen]
    if missing:
        raise DataError(f"{where}: missing class folder(s) {', '.join(missing)} under {strip or './'}")
    return _interleave(entries)


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            a = np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises many types on corrupt data
        raise DataError(f"{name}: unreadable image ({e})") from None
    if a.shape != (32, 32, 3):
        raise DataError(f"{name}: expected a 32x32 image, found {a.shape[1]}x{a.shape[0]}")
    return a


def _read_entries(entries, read, limit, progress, desc) -> Dataset:
    if limit is not None:
        entries = entries[:limit]
    images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
    it = entries
    if progress:
        it = tqdm(entries, desc=desc, unit="img", leave=False)
    for i, (name, _) in enumerate(it):
        images[i] = _decode(read(name), name)
    labels = np.array([label for _, label in entries], dtype=np.int64)
    return Dataset(images, labels, [name for name, _ in entries])


def _from_zip(path: Path, split: str, limit, progress) -> Dataset:
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip file ({e})") from None
    with z:
        entries = _class_entries(z.namelist(), str(path), f"{split}/")
        return _read_entries(entries, z.read, limit, progress, f"reading {path.name}")


def _from_folder(root: Path, split: str, limit, progress) -> Dataset:
    base = root / split if (root / split).is_dir() else root
    names = [p.relative_to(base).as_posix() for p in base.glob("*/*") if p.is_file()]
    entries = _class_entries(names, str(base), "")
    return _read_entries(entries, lambda n: (base / n).read_bytes(), limit, progress, f"reading {base}")


class _SafeUnpickler(pickle.Unpickler):
    """Builds only plain containers and NumPy arrays: enough for CIFAR-10 batches, nothing else."""

    @staticmethod
    def _latin1(text, encoding="latin1"):
        """``_codecs.encode`` as protocol-2 pickles from Python 3 use it for bytes: latin-1 only."""
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own array reconstructor
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            return self._latin1
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(d["labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{name}: not a CIFAR-10 python batch ({e})") from None
    if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{name}: inconsistent CIFAR-10 batch (images {len(x)}, labels {len(y)})")
    return np.ascontiguousarray(x), y


def _from_batches(read, where: str, split: str, limit) -> Dataset:
    xs, ys, names = [], [], []
    for b in BATCHES[split]:
        x, y = _unpickle_batch(read(b), f"{where}/{b}")
        xs.append(x)
        ys.append(y)
        names += [f"{b}[{i}]" for i in range(len(y))]
    x, y = np.concatenate(xs), np.concatenate(ys)
    n = len(y) if limit is None else min(limit, len(y))
    return Dataset(x[:n], y[:n], names[:n])


def _from_tarball(path: Path, split: str, limit) -> Dataset:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None
    with tar:

        def read(b):
            try:
                f = tar.extractfile(f"cifar-10-batches-py/{b}")
            except KeyError:
                f = None
            if f is None:
                raise DataError(f"{path}: missing cifar-10-batches-py/{b}")
            return f.read()

        return _from_batches(read, str(path), split, limit)


def load_cifar10(
    path: str | os.PathLike, split: str = "test", limit: int | None = None, progress: bool = False
) -> Dataset:
    """Read a CIFAR-10 split from any supported layout (see module docstring)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, found {split!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, found {limit}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if not path.is_file() and not path.is_dir():
        raise DataError(f"{path}: {input_problem(path)}")
    if path.is_file():
        if zipfile.is_zipfile(path):
            return _from_zip(path, split, limit, progress)
        if tarfile.is_tarfile(path):
            return _from_tarball(path, split, limit)
        raise DataError(f"{path}: neither a zip of JPEGs nor the cifar-10-python tarball")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"{path}: folder is not readable")
    if (path / f"cifar10-{split}-jpg.zip").is_file():
        return _from_zip(path / f"cifar10-{split}-jpg.zip", split, limit, progress)
    if (path / TARBALL).is_file():
        return _from_tarball(path / TARBALL, split, limit)
    batches = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    if (batches / BATCHES[split][0]).is_file():
        return _from_batches(lambda b: (batches / b).read_bytes(), str(batches), split, limit)
    return _from_folder(path, split, limit, progress)


def data_dir_from_env() -> Path | None:
    """``TINYVIT158_DATA`` as a Path, or None when unset or empty."""
    value = os.environ.get("TINYVIT158_DATA", "").strip()
    return Path(value) if value else None


def data_arg(parser, value: str | None) -> str:
    """A command's ``--data``, or ``TINYVIT158_DATA`` when it is not given; a usage error
    (``parser.error``) when neither is."""
    path = value or data_dir_from_env()
    if not path:
        parser.error("--data is required (or set TINYVIT158_DATA to the folder holding the CIFAR-10 zips)")
    return str(path)


def split_holdout(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``holdout`` images, the same number from each class."""
    rng = np.random.default_rng([seed, 12345])
    classes = np.unique(labels)
    per = holdout // len(classes)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes])
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, np.sort(val)
