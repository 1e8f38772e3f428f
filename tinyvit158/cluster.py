"""The Ray backend of ``pipeline.classify``: ``evaluate --ray [ADDRESS]`` and ``predict --ray [ADDRESS]``.

The same work as :func:`tinyvit158.pipeline.stream` plus the engine, through Ray Data (the
``cluster`` extra installs ``ray[data]``):

1. a dataset of the file paths (``ray.data.from_items``), in file order;
2. ``map_batches(decode)``: tasks decode, resize and normalize the images
   (``image.load_image``); an unreadable file becomes its one-line error, not a failure;
3. ``map_batches(EngineActor, concurrency=actors)``: actors that each hold one ``Engine``,
   built from the weight file's bytes (put in the object store once, so no node reads a
   shared disk), run the batches;
4. the rows come back in file order (``preserve_order``), and are yielded as
   :func:`~tinyvit158.pipeline.stream` yields batches, with the logits.

With no ADDRESS a local Ray instance is started (and stopped at the end); with one, the
driver connects to that cluster (``ray.init(address=...)``: ``auto``, ``host:6379``, or
``ray://host:10001`` through Ray Client, which the ``cluster`` extra installs). An address
where nothing listens is refused at once (a TCP probe of its port), and a cluster not
reached within ``--ray-timeout`` seconds (default 30) ends the run in one line: Ray
itself would retry for ever.
Results are those of the local run, bit for bit: every actor runs the same engine on the
same decoded images, and the engine computes each image independently of its batch.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numba
import numpy as np

from tinyvit158.config import ViTConfig
from tinyvit158.engine import Engine
from tinyvit158.errors import TinyViTError
from tinyvit158.image import decode
from tinyvit158.weights import Checkpoint, load_weights, serialize

DECODE_CPUS = 0.25  # the logical CPUs a decoding task asks of Ray


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise TinyViTError("--ray needs Ray Data: pip install -e '.[cluster]'") from None
    return ray


def _decode_batch(batch: dict, cfg: ViTConfig) -> dict:
    """A Ray Data batch of paths -> images (n, C, S, S) float32 and errors ('' where none)."""
    blank = np.zeros((cfg.in_chans, cfg.image_size, cfg.image_size), np.float32)
    decoded = [decode(str(path), cfg) for path in batch["path"]]
    images = [blank if isinstance(d, str) else d for d in decoded]
    errors = [d if isinstance(d, str) else "" for d in decoded]
    return {"index": batch["index"], "image": np.stack(images), "error": np.array(errors, dtype=object)}


class EngineActor:
    """One ``Engine`` a Ray actor, built from a weight file's bytes; ``threads``: Numba threads."""

    def __init__(self, weights, threads: int):
        if not isinstance(weights, bytes):  # [object reference]: fetched from the object store
            import ray

            weights = ray.get(weights[0])

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        with tempfile.TemporaryDirectory() as tmp:  # load_weights validates, as for any file
            path = Path(tmp) / "weights.safetensors"
            path.write_bytes(weights)
            self.engine = Engine(load_weights(path))

    def __call__(self, batch: dict) -> dict:
        good = np.array([e == "" for e in batch["error"]], dtype=bool)
        logits = np.zeros((len(good), self.engine.cfg.num_classes), np.float32)
        if good.any():
            logits[good] = self.engine(np.ascontiguousarray(batch["image"][good]))
        return {"index": batch["index"], "logits": logits, "error": batch["error"]}


DEFAULT_TIMEOUT = 30.0  # seconds to reach a Ray cluster (--ray-timeout)


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a Ray address (``ray://host:port`` or ``host:port``), or None (``auto``)."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address.strip())
    return (m.group(1), int(m.group(2))) if m else None


def probe(address: str, timeout: float) -> None:
    """Refuse in one line, within ``timeout`` seconds, an address where nothing answers: a
    TCP connection to its port, before Ray (which would retry for ever) is asked."""
    where = _host_port(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise TinyViTError(f"could not reach the Ray cluster at {address}: {why} (is it running?)") from None


def _give_up(address: str, timeout: float) -> None:
    """The watchdog's end: Ray is still retrying inside ``ray.init`` and cannot be stopped
    from here, so the process ends with the one line and exit status 1."""
    print(f"error: could not reach the Ray cluster at {address} within {timeout:g} s "
          "(is it a Ray cluster? --ray-timeout SECONDS waits longer)", file=sys.stderr, flush=True)  # fmt: skip
    os._exit(1)


def connect(address: str | None, num_cpus: int | None = None, timeout: float = DEFAULT_TIMEOUT):
    """Ray, initialized: a local instance (``address`` None) or a running cluster, reached
    within ``timeout`` seconds or given up in one line (the process then ends: Ray cannot
    be stopped mid-connection). Returns (ray, started): ``started`` when this call started it
    (the caller shuts it down)."""
    ray = _ray()
    if address is not None and address.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (what ray[client] adds)
            import ray.util.client  # noqa: F401
        except ImportError:
            raise TinyViTError(f"--ray {address}: needs Ray Client: pip install 'ray[client]'") from None
    for name in ("ray", "ray.data"):  # Ray Data's plan, timing and progress-bar notices
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return ray, False
    if address is not None:
        probe(address, timeout)
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    watchdog = threading.Timer(timeout, _give_up, (address, timeout)) if address is not None else None
    if watchdog is not None:  # a local instance either starts or fails: Ray does not retry it
        watchdog.daemon = True
        watchdog.start()
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ...: one line, not Ray's traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise TinyViTError(f"could not start or reach {where}: {msg}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
    return ray, True


def ray_stream(
    paths: list,
    ckpt: Checkpoint,
    batch: int,
    actors: int = 1,
    address: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[tuple[list[int], np.ndarray, dict]]:
    """Batches ``(indices, logits (n, classes) float32 of the good images, {index: error})``
    in file order, computed on Ray (the module docstring); ``timeout``: :func:`connect`'s."""
    ray, started = connect(address, timeout=timeout)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        cfg = ckpt.config
        # once into the object store; each actor fetches the bytes (a reference in a list, so
        # that Ray passes the reference and the actor fetches them itself)
        weights = [ray.put(serialize(ckpt))]
        total_cpus = int(ray.cluster_resources().get("CPU", 1))
        if not 1 <= actors <= total_cpus:
            raise TinyViTError(f"--actors {actors}: the Ray cluster has {total_cpus} CPUs; ask for 1 to {total_cpus}")
        threads = max(1, total_cpus // actors)  # Numba threads an engine
        ds = ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(paths)])
        # Ray schedules by logical CPUs: an actor reserves 3/4 of its share and each decoding
        # task 1/4 of a CPU, so decoding always finds room (were the actors to take every
        # CPU, the decode tasks would wait for ever)
        ds = ds.map_batches(
            _decode_batch, fn_kwargs={"cfg": cfg}, batch_size=batch, batch_format="numpy", num_cpus=DECODE_CPUS
        )
        with warnings.catch_warnings():  # the documented way to say it (below) is deprecated from Ray 2.60
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(
                EngineActor,
                fn_constructor_kwargs={"weights": weights, "threads": threads},
                batch_size=batch,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=threads * (1 - DECODE_CPUS),
                # Ray Data restarts failed actors by default, and then logs an error line on every
                # run, as its constructor arguments live in the object store (ray-project/ray#57733;
                # such a restart would fail anyway, ray#53727): a failure here ends the run instead
                max_restarts=0,
            )
        for out in ds.iter_batches(batch_size=batch, batch_format="numpy"):
            idx = [int(i) for i in out["index"]]
            errors = {i: str(e) for i, e in zip(idx, out["error"], strict=True) if e}
            good = np.array([i not in errors for i in idx], dtype=bool)
            yield idx, np.asarray(out["logits"], np.float32)[good], errors
    finally:
        if started:
            ray.shutdown()


def add_arguments(p) -> None:
    """``--ray [ADDRESS]`` and ``--actors N`` on an argparse parser."""
    p.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="run on Ray (the cluster extra): a local instance, or the cluster at ADDRESS (auto, ray://host:port)",
    )  # fmt: skip
    p.add_argument(
        "--actors", type=_at_least_one, default=1, metavar="N", help="--ray: engines (Ray actors) to run (default 1)"
    )
    p.add_argument(
        "--ray-timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"--ray: give up reaching the cluster after this long (default {DEFAULT_TIMEOUT:g})",
    )  # fmt: skip


def _positive_seconds(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not 0 < t < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return t


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


__all__ = ["EngineActor", "add_arguments", "connect", "ray_stream"]
