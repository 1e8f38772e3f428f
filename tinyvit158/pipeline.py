"""The application layer the commands share: a model from a weight file, image files in,
logits out, a batch at a time.

- :func:`load_model`: a weight file (default: the shipped integer-numerics model) as a validated checkpoint;
- :func:`image_paths`: command-line arguments as image files (a folder: its images);
- :func:`make_model`: the fast ``Engine`` or the float64 ``Oracle`` of a checkpoint;
- :func:`stream`: images decoded (``image.decode``: draft-mode JPEG, resize, normalize) in
  this process or a pool of worker processes, yielded as batches in file order; at most
  two windows of ``4 x workers`` batches are in flight, so memory stays flat however many
  files there are;
- :func:`classify`: :func:`stream` and the model here, or the whole job on Ray
  (``cluster.py``, the Ray backend);
- :func:`run_engine`: a model over decoded uint8 images (CIFAR-10), with a progress bar.

Commands (``predict``, ``evaluate``, ``convert``, ...) import this module and never each
other.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinyvit158 import cluster
from tinyvit158.config import ViTConfig, get_preset
from tinyvit158.engine import Engine
from tinyvit158.errors import TinyViTError
from tinyvit158.folders import IMAGE_SUFFIXES, image_files
from tinyvit158.image import URL, decode, normalize
from tinyvit158.integer import IntegerOracle
from tinyvit158.kernels.linear import KERNEL_ENV, kernel_path
from tinyvit158.oracle import Oracle
from tinyvit158.runtime import first_run_notice
from tinyvit158.weights import Checkpoint, default_model_path, load_weights, random_checkpoint

RANDOM_NOTE = (
    "note: no trained weights are shipped yet; using a RANDOM cifar10-tiny model, "
    "so the labels below are meaningless (pass --weights FILE to use real weights)"
)


def load_model(weights: str | None) -> tuple[Checkpoint, str]:
    """The checkpoint of ``weights`` (default: the shipped file) and the name to show for it:
    the path as given, or the shipped file's name (no machine path)."""
    if weights is not None:
        return load_weights(weights), str(weights)
    path = default_model_path()
    if path is not None:
        return load_weights(path), f"{path.name} (shipped)"
    print(RANDOM_NOTE, file=sys.stderr)
    return random_checkpoint(get_preset("cifar10-tiny")), "random cifar10-tiny"


def image_paths(args: list[str]) -> list[Path | str]:
    """Files as given; folders become their image files, sorted (hidden ones skipped)."""
    out: list[Path | str] = []
    for arg in args:
        if URL.match(arg):  # kept as typed (a Path would fold its "//"); image.open_rgb refuses it
            out.append(arg)
            continue
        p = Path(arg)
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise TinyViTError(f"{p}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        else:
            out.append(p)
    return out


def make_model(ckpt: Checkpoint, engine: str = "fast"):
    """The fast ``Engine`` of a checkpoint (its numerics, float or integer), or its
    reference: the float64 ``Oracle``, or for integer numerics the int64 ``IntegerOracle``."""
    if engine == "fast":
        return Engine(ckpt)
    return IntegerOracle(ckpt) if ckpt.config.numerics == "integer" else Oracle(ckpt)


def engine_name(cfg: ViTConfig, engine: str) -> str:
    """What runs a config, for the commands' reports: "fast", "oracle", or (integer numerics'
    reference) "integer reference"."""
    return "integer reference" if cfg.numerics == "integer" and engine != "fast" else engine


def numerics_line(cfg: ViTConfig, engine: str) -> str:
    """What ``--explain`` says ran: the numerics, and the kernel path (``TINYVIT158_KERNEL``)
    where the fast engine ran them."""
    where = engine_name(cfg, engine)
    path = (
        f"; kernel path: {kernel_path()} ({KERNEL_ENV}={os.environ.get(KERNEL_ENV, 'auto')})" if where == "fast" else ""
    )
    return f"# numerics: {cfg.numerics} ({cfg.attention} attention); {where} engine{path}"


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


def _decode(path) -> np.ndarray | str:
    """``image.decode`` in a worker process, for the config it was started with."""
    return decode(path, _CFG)


def stream(paths: list, cfg: ViTConfig, batch: int, workers: int = 1) -> Iterator[tuple[list[int], np.ndarray, dict]]:
    """Batches ``(indices, images (n, C, S, S) float32, {index: error})`` in file order.
    ``workers`` > 1 decodes in that many processes; at most two windows of ``4 x workers``
    batches are decoded ahead of the consumer."""
    window = batch * 4 * max(workers, 1)
    starts = range(0, len(paths), window)
    if workers <= 1:
        for s in starts:
            yield from _batches(s, [decode(p, cfg) for p in paths[s : s + window]], batch, cfg)
        return
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


def _batches(start: int, decoded: list, batch: int, cfg: ViTConfig):
    for b in range(0, len(decoded), batch):
        part = decoded[b : b + batch]
        idx = [start + b + i for i in range(len(part))]
        errors = {i: d for i, d in zip(idx, part, strict=True) if isinstance(d, str)}
        good = [d for d in part if not isinstance(d, str)]
        shape = (0, cfg.in_chans, cfg.image_size, cfg.image_size)
        yield idx, (np.stack(good) if good else np.zeros(shape, np.float32)), errors


def classify(
    paths: list,
    ckpt: Checkpoint,
    batch: int,
    workers: int = 1,
    engine: str = "fast",
    ray: str | None = None,
    actors: int = 1,
    explain: bool = False,
    ray_timeout: float = cluster.DEFAULT_TIMEOUT,
) -> Iterator[tuple[list[int], np.ndarray, dict, dict | None]]:
    """Batches ``(indices, logits of the good images, {index: error}, record)`` in file order:
    decoded in ``workers`` processes (:func:`stream`) and run here by the ``engine`` ("fast"
    or "oracle"), or all of it on Ray (``ray``: "" a local instance, else a cluster address;
    ``actors`` engines, ``ray_timeout`` seconds to reach a cluster; ``cluster.py``).
    ``record``: with ``explain``, the codes of the first batch that holds an image (for the
    ledger), else None."""
    if ray is not None:
        for idx, logits, errors in cluster.ray_stream(paths, ckpt, batch, actors, ray or None, ray_timeout):
            yield idx, logits, errors, None
        return
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


def run_engine(model, images: np.ndarray, cfg: ViTConfig, batch: int, desc: str) -> tuple[np.ndarray, float]:
    """Logits for uint8 images [n, H, W, 3] (normalized here), with a progress bar on
    stderr; returns (logits, seconds)."""
    out = []
    t0 = time.perf_counter()
    with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr, leave=False) as bar:
        for i in range(0, len(images), batch):
            x = np.stack([normalize(im, cfg) for im in images[i : i + batch]])
            out.append(model(x))
            bar.update(len(x))
    return np.concatenate(out).astype(np.float32), time.perf_counter() - t0
