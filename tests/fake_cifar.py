"""Small CIFAR-10 look-alikes written by the tests: the official python tarball and the JPEG zips."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from tinyvit158.config import CIFAR10_CLASSES


def make_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent colour blobs, so a tiny model can learn something."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    rng.shuffle(labels)
    base = rng.integers(0, 256, size=(10, 1, 1, 3))
    noise = rng.integers(-40, 41, size=(len(labels), 32, 32, 3))
    images = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def _batch_bytes(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    d = {
        b"batch_label": name.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy(),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(d, protocol=2)


def write_tarball(path: Path, train: tuple, test: tuple) -> Path:
    """The official layout: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta."""
    members = {}
    xs, ys = np.array_split(train[0], 5), np.array_split(train[1], 5)
    for i in range(5):
        members[f"data_batch_{i + 1}"] = _batch_bytes(xs[i], ys[i], f"training batch {i + 1} of 5")
    members["test_batch"] = _batch_bytes(*test, "testing batch 1 of 1")
    members["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_jpeg_zip(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    counters = dict.fromkeys(range(10), 0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for img, y in zip(images, labels, strict=False):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            z.writestr(f"{split}/{CIFAR10_CLASSES[y]}/{counters[int(y)]:04d}.jpg", buf.getvalue())
            counters[int(y)] += 1
    return path
