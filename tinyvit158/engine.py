"""The fast engine: the oracle's function, computed from packed ternary weights with
Numba int8 x ternary kernels (exact int32 accumulation); LayerNorm and attention in
float64 rounded once to float32, GELU and the rest in float32 (``kernels/ops.py`` says why).

Tokens of the whole batch are flattened to rows, ``T = B * (N + 1)``, for every linear
layer; attention runs per image. Each quantizer is fused into the step that produces its
input (LayerNorm -> int8, GELU -> int8, attention -> int8), so a block is:

    qkv = linear(x_q, s, qkv)                                          (T, 3D)
    o_q, s = attn[i].quantize(qkv)       (float64 or int8 attention, as the config says)
    x += linear(o_q, s, proj);    h_q, s = layernorm_quantize(x, norm2)
    g_q, s = gelu_quantize(linear(h_q, s, fc1))                        (T, hidden)
    x += linear(g_q, s, fc2);     x_q, s = layernorm_quantize(x, next block's norm1)

where ``x_q`` came from the previous block (the first block's from ``norm1``). When every
layer of the blocks is ternary and the VNNI path runs, each call is one kernel (one
parallel region), seven a block: qkv; the block's attention object
(``kernels.attention_op``: float64, or the integer ``kernels.qattn``), which also makes
its rows' codes; proj into the residual stream, then LayerNorm 2 and its codes; fc1, GELU
and codes in one pass (``kernels.linear_gelu_quantize``: whole output rows finished in
cache, bit-identical to the steps one after the other); fc2 into the residual stream,
then the next LayerNorm and its codes (residual + LayerNorm as one pass measured slower:
``kernels/fused.py``). Other models (float layers, BitLinear norms) run the steps one by
one.

On the VNNI path those calls are bound to their buffers once per batch size (``_plan``)
and then run back to back, with no Python checks or argument building between them: at
batch 1 that took a fifth of a call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numba
import numpy as np

from tinyvit158.errors import TinyViTError
from tinyvit158.kernels import (
    PreparedTernary,
    attention_op,
    float_linear,
    fused,
    gelu,
    gelu_quantize,
    kernel_path,
    layernorm,
    layernorm_quantize,
    linear,
    linear_gelu_quantize,
    quantize_rows,
)
from tinyvit158.kernels.ops import bind_layernorm_quantize
from tinyvit158.kernels.ternary import bind_linear, fits_vnni_tiles
from tinyvit158.oracle import patchify
from tinyvit158.weights import Checkpoint, load_weights

PACKED_DEFAULT = True  # 2-bit weights, spread to bytes per job in cache: as fast as 1-byte ones in bench


COMPILE_NOTICE = (
    "tinyvit158: compiling the Numba kernels for this CPU (the first run only: 10-30 s; "
    "later runs load them from the cache)"
)


@contextlib.contextmanager
def first_run_notice(after_s: float = 2.0, stream=None):
    """Say on stderr why a call is slow if it takes longer than ``after_s``: on a new
    install (or CPU) the first call compiles the kernels, which takes tens of seconds."""
    timer = threading.Timer(after_s, lambda: print(COMPILE_NOTICE, file=stream or sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class ThreadGovernor:
    """Adaptive threads: run each call with the thread count that is faster right now.

    Every parallel region waits at its end for its slowest thread. When another busy
    process takes a core, the operating system deschedules one of ours for a whole time
    slice, and a call of ~30 regions waits for it again and again, where one thread would
    not (docs/PERFORMANCE.md). So the governor times each call, per batch size, at the current Numba
    thread count ``n`` and at 1, runs the faster (:func:`_faster`: the best of each one's
    last three calls, with a margin in favour of ``n``), and every ``probe`` calls runs
    the other once, to notice when the load changes. Each is tried twice first (the very
    first call warms buffers up). Results do not depend on the thread count: every
    kernel computes each row the same way whichever thread takes it.
    ``TINYVIT158_ADAPTIVE_THREADS=0`` turns it off (always ``n``).
    """

    def __init__(self, probe: int = 16):
        self.probe = probe
        self.enabled = os.environ.get("TINYVIT158_ADAPTIVE_THREADS", "1") != "0"
        self._stats: dict[tuple[int, int], dict] = {}  # (batch, n) -> {"calls", threads -> recent seconds}
        self._lock = threading.Lock()

    def choose(self, batch: int, n: int) -> int:
        """The thread count for the next call of ``batch`` images (``n``: the most allowed)."""
        if not self.enabled or n <= 1:
            return n
        with self._lock:
            st = self._stats.setdefault((batch, n), {"calls": 0, n: [], 1: []})
            st["calls"] += 1
            for c in (n, 1):
                if len(st[c]) < 2:
                    return c
            best = _faster(st, n)
            if st["calls"] % self.probe == 0:
                return 1 if best == n else n
            return best

    def record(self, batch: int, n: int, threads: int, seconds: float) -> None:
        if not self.enabled or n <= 1:
            return
        with self._lock:
            times = self._stats[(batch, n)][threads]
            times.append(seconds)
            del times[:-3]

    def current(self, batch: int, n: int) -> int | None:
        """The thread count the governor now prefers for ``batch`` (None: not decided yet)."""
        st = self._stats.get((batch, n))
        if st is None or len(st[1]) < 2 or len(st[n]) < 2:
            return None
        return _faster(st, n)


def _faster(st: dict, n: int) -> int:
    """n, unless 1 thread has been clearly faster: the fastest of each one's last three
    calls (a call slowed by a passing hiccup does not count; a contended count is slow
    every time), and 1 only when it beats n by ``1 / ONE_THREAD_MARGIN``."""
    return 1 if min(st[1]) < ONE_THREAD_MARGIN * min(st[n]) else n


ONE_THREAD_MARGIN = 0.8  # quiet, 1 thread is ~1.25-1.6x slower; beside a busy process ~0.4x


class Engine:
    """A ternary ViT ready to run.

    Parameters
    ----------
    ckpt : Checkpoint
        Validated weights (``weights.load_weights``), re-laid out once here for the kernels.
    packed : bool
        VNNI path: keep the weights 2 bits each in memory and spread them to bytes inside
        the tile (about 1/14 of the float32 model resident), or 1 byte each (1/4).

    Examples
    --------
    >>> engine = Engine.from_file("weights/cifar10-tiny.safetensors")  # doctest: +SKIP
    >>> logits = engine(images)  # float32 [B, 3, 32, 32], normalized -> [B, 10]  # doctest: +SKIP

    Intermediate arrays (codes, qkv, attention output, MLP hidden) live in buffers kept
    per thread and reused by the next call of the same batch size (a call with another
    size replaces them): fresh multi-megabyte arrays cost a page fault per 4 KiB on first
    touch (about 15% of a batch-64 run).
    Calls from several threads are safe; arrays the engine returns are always new.
    """

    def __init__(self, ckpt: Checkpoint, packed: bool = PACKED_DEFAULT):
        self.cfg = cfg = ckpt.config
        if cfg.numerics != "float":
            raise TinyViTError(
                f"numerics={cfg.numerics!r} runs in its int64 reference only so far (integer.IntegerOracle; "
                "--engine oracle on the command line), not in the fast engine"
            )
        self.packed = packed
        t = ckpt.tensors
        layers = cfg.linear_shapes()
        # the float tensors no linear layer owns: embeddings, norms (BitLinear norms included)
        self.p = {
            k: np.ascontiguousarray(v, dtype=np.float32)
            for k, v in t.items()
            if v.dtype == np.float32 and k.rsplit(".", 1)[0] not in layers
        }
        self.ternary: dict[str, PreparedTernary] = {}
        self.float: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for layer in cfg.linear_shapes():
            if cfg.is_ternary(layer):
                self.ternary[layer] = PreparedTernary(*ckpt.ternary(layer), packed=packed)
                self.ternary[layer].compact(kernel_path())  # the kernel's layout only (VNNI packed: 2 bits)
            else:
                w = np.ascontiguousarray(ckpt.float_weight(layer).T)  # (in, out) for x @ w
                self.float[layer] = (w, t[f"{layer}.bias"].astype(np.float32))
        self.cls_pos = self.p["pos_embed"][0, :1] + self.p["cls_token"][0]  # (1, D)
        # each block's attention kernel (float or int8, as the config says), called alike
        self.attn = [attention_op(cfg, self.p, i) for i in range(cfg.depth)]
        self.record: dict[str, np.ndarray] | None = None  # layer -> int8 input codes (tests)
        self.timings: dict[str, float] | None = None  # part -> seconds (bench --layers)
        self.trace: dict[str, np.ndarray] | None = None  # stage -> output, the oracle's stage names
        blocks = [layer for layer in cfg.linear_shapes() if layer.startswith("blocks.")]
        self._fused = not cfg.bitlinear_norm and all(layer in self.ternary for layer in blocks)
        self._workspace = threading.local()
        self.governor = ThreadGovernor()

    def _buf(self, key: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """This thread's reusable buffer ``key`` (reallocated when the shape changes)."""
        bufs = self._workspace.__dict__.setdefault("bufs", {})
        buf = bufs.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = bufs[key] = np.empty(shape, dtype=dtype)
        return buf

    def _codes_buf(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T, K = x.shape  # keyed by shape: the head's (B, D) codes must not evict the blocks' (T, D)
        return self._buf(f"codes{T}x{K}", (T, K), np.int8), self._buf(f"scales{T}", (T,))

    def _keep(self, stage: str, x: np.ndarray) -> None:
        if self.trace is not None:
            self.trace[stage] = x.copy()

    def _toc(self, part: str, t0: float) -> float:
        """Add the time since ``t0`` to ``part`` when timing; returns the new start."""
        t1 = time.perf_counter()
        self.timings[part] = self.timings.get(part, 0.0) + t1 - t0
        return t1

    @classmethod
    def from_file(cls, path: str | os.PathLike, packed: bool = PACKED_DEFAULT) -> Engine:
        return cls(load_weights(path), packed)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight the engine holds: ternary layouts, scales, float tensors."""
        floats = sum(a.nbytes for a in self.p.values()) + sum(w.nbytes for w, _ in self.float.values())
        return floats + sum(w.nbytes for w in self.ternary.values())

    # -- one linear layer, with whatever precedes it fused into its quantizer ------------
    def _ln(self, x: np.ndarray, name: str) -> np.ndarray:
        return layernorm(x, self.p[f"{name}.weight"], self.p[f"{name}.bias"], self.cfg.norm_eps)

    def _ln_quantize(self, x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        p = self.p
        return layernorm_quantize(x, p[f"{name}.weight"], p[f"{name}.bias"], self.cfg.norm_eps, self._codes_buf(x))

    def linear(
        self,
        x: np.ndarray,
        layer: str,
        norm: str | None = None,
        act: bool = False,
        residual: np.ndarray | None = None,
        out: str | None = None,
    ) -> np.ndarray:
        """``layer(act(norm(x)))`` for float32 rows ``x`` (T, in) -> (T, out).

        ``norm`` names a LayerNorm applied first; ``act`` applies GELU first; ``residual``
        (T, out) has the result added to it in place and is returned; ``out`` names the
        workspace buffer to write the result into (else it is a new array).
        """
        timing = self.timings is not None
        t0 = time.perf_counter() if timing else 0.0
        part = layer.rsplit(".", 1)[-1] if layer.startswith("blocks.") else layer.split(".")[0]
        if layer in self.float or self.cfg.bitlinear_norm:
            if norm is not None:
                x = self._ln(x, norm)
            if act:
                x = gelu(x)
            if layer in self.float:
                if timing:
                    t0 = self._toc("norm+quant" if norm else "gelu+quant" if act else "quant", t0)
                y = float_linear(x, *self.float[layer])
                if residual is not None:
                    residual += y
                    y = residual
                if timing:
                    self._toc(part, t0)
                return y
            x_q, s_x = self._ln_quantize(x, f"{layer}.norm")
        elif norm is not None:
            x_q, s_x = self._ln_quantize(x, norm)
        elif act:
            x_q, s_x = gelu_quantize(x, self._codes_buf(x))
        else:
            x_q, s_x = quantize_rows(x, self._codes_buf(x))
        if self.record is not None:
            self.record[layer] = x_q.copy()
        if timing:
            t0 = self._toc("norm+quant" if norm else "gelu+quant" if act else "quant", t0)
        w = self.ternary[layer]
        dest = None if out is None or residual is not None else self._buf(out, (x.shape[0], w.out_features))
        y = linear(x_q, s_x, w, residual=residual, out=dest)
        if timing:
            self._toc(part, t0)
        return y

    def _blocks_fused(self, x: np.ndarray, B: int) -> None:
        """Every block, ``x`` (T, D) updated in place, each step one kernel (module docstring)."""
        timing, record = self.timings is not None, self.record
        t0 = time.perf_counter() if timing else 0.0
        x_q, s_x = self._ln_quantize(x, "blocks.0.norm1")
        if timing:
            t0 = self._toc("norm+quant", t0)
        plan = self._plan(x, B)
        if plan is None:
            return self._blocks_stepwise(x, B, x_q, s_x)
        for part, fn, args, inputs, block, outputs in plan:
            if record is not None and inputs is not None:
                record[inputs[0]] = inputs[1].copy()
            fn(*args)
            if record is not None:
                record.update({site: codes.copy() for site, codes in outputs.items()})
            if timing:
                t0 = self._toc(part, t0)
            if block is not None:
                self._keep(block, x.reshape(B, -1, x.shape[1]))

    def _plan(self, x: np.ndarray, B: int) -> list | None:
        """The blocks' kernel calls, bound once per batch size to this thread's buffers, so a
        forward runs them back to back: no checks, lookups or argument building between
        them (at batch 1 those took 0.3 of 1.6 ms). Each step: (part, kernel, args, the
        layer and input codes it reads, for ``record``; the block it ends, for ``trace``; the
        codes it makes besides, by site, for ``record``: the int8 attention's q, k, v, p).
        None off the VNNI path or for shapes off its tiles: then :meth:`_blocks_stepwise`."""
        if kernel_path() != "vnni" or numba.config.DISABLE_JIT:  # asked each call: the path may change
            return None
        bufs = self._workspace.__dict__["bufs"]
        key = "plan", self.record is not None  # recording binds arrays for the attention's codes
        if key in bufs:
            return bufs[key]
        cfg, p, tern = self.cfg, self.p, self.ternary
        T, D = x.shape
        codes = self._codes_buf(x)
        attn = self._buf("attn_codes", (T, D), np.int8), self._buf("attn_scales", (T,))
        hidden = self._buf("hidden_codes", (T, cfg.hidden_dim), np.int8), self._buf("hidden_scales", (T,))
        qkv = self._buf("qkv", (T, 3 * D))
        plan, eps = [], cfg.norm_eps
        for i in range(cfg.depth):
            blk = f"blocks.{i}"
            w = {k: tern[f"{blk}.{k}"] for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
            if not self.attn[i].bindable(D // cfg.heads) or not all(map(fits_vnni_tiles, w.values())):
                bufs[key] = None
                return None
            codes_made = {} if self.record is not None else None  # site suffix -> array the kernel fills
            norm2 = p[f"{blk}.norm2.weight"], p[f"{blk}.norm2.bias"], eps
            plan += [
                ("qkv", *bind_linear(*codes, w["attn.qkv"], qkv, False), (f"{blk}.attn.qkv", codes[0]), None, {}),
                ("attention+quant", *self.attn[i].bind(qkv.reshape(B, -1, 3 * D), cfg.heads, codes=attn,
                 record=codes_made), None, None, {f"{blk}.attn.{k}": v for k, v in (codes_made or {}).items()}),
                ("proj", *bind_linear(*attn, w["attn.proj"], x, True), (f"{blk}.attn.proj", attn[0]), None, {}),
                ("norm+quant", *bind_layernorm_quantize(x, *norm2, codes), None, None, {}),
                ("fc1+gelu+quant", *fused.bind(*codes, w["mlp.fc1"], *hidden),
                 (f"{blk}.mlp.fc1", codes[0]), None, {}),
            ]  # fmt: skip
            plan.append(("fc2", *bind_linear(*hidden, w["mlp.fc2"], x, True), (f"{blk}.mlp.fc2", hidden[0]), blk, {}))
            if i + 1 < cfg.depth:
                norm1 = p[f"blocks.{i + 1}.norm1.weight"], p[f"blocks.{i + 1}.norm1.bias"], eps
                plan.append(("norm+quant", *bind_layernorm_quantize(x, *norm1, codes), None, None, {}))
        bufs[key] = plan
        return plan

    def _blocks_stepwise(self, x: np.ndarray, B: int, x_q: np.ndarray, s_x: np.ndarray) -> None:
        """:meth:`_blocks_fused` through the checked kernel functions, step by step (the
        generic path; each fused function runs its steps where it has no one-pass kernel)."""
        cfg, tern = self.cfg, self.ternary
        T, D = x.shape
        timing, record = self.timings is not None, self.record
        t0 = time.perf_counter() if timing else 0.0
        attn_codes = self._buf("attn_codes", (T, D), np.int8), self._buf("attn_scales", (T,))
        hidden_codes = self._buf("hidden_codes", (T, cfg.hidden_dim), np.int8), self._buf("hidden_scales", (T,))
        for i in range(cfg.depth):
            blk = f"blocks.{i}"
            if record is not None:
                record[f"{blk}.attn.qkv"] = x_q.copy()
            qkv = linear(x_q, s_x, tern[f"{blk}.attn.qkv"], out=self._buf("qkv", (T, 3 * D)))
            if timing:
                t0 = self._toc("qkv", t0)
            made = {} if record is not None else None
            o_q, o_s = self.attn[i].quantize(qkv.reshape(B, T // B, 3 * D), cfg.heads, attn_codes, record=made)
            if record is not None:
                record.update({f"{blk}.attn.{k}": v for k, v in made.items()})
                record[f"{blk}.attn.proj"] = o_q.copy()
            if timing:
                t0 = self._toc("attention+quant", t0)
            linear(o_q, o_s, tern[f"{blk}.attn.proj"], residual=x)
            if timing:
                t0 = self._toc("proj", t0)
            h_q, h_s = self._ln_quantize(x, f"{blk}.norm2")
            if record is not None:
                record[f"{blk}.mlp.fc1"] = h_q.copy()
            if timing:
                t0 = self._toc("norm+quant", t0)
            g_q, g_s = linear_gelu_quantize(h_q, h_s, tern[f"{blk}.mlp.fc1"], hidden_codes)
            if record is not None:
                record[f"{blk}.mlp.fc2"] = g_q.copy()
            if timing:
                t0 = self._toc("fc1+gelu+quant", t0)
            linear(g_q, g_s, tern[f"{blk}.mlp.fc2"], residual=x)
            if timing:
                t0 = self._toc("fc2", t0)
            self._keep(blk, x.reshape(B, T // B, D))
            if i + 1 < cfg.depth:
                x_q, s_x = self._ln_quantize(x, f"blocks.{i + 1}.norm1")
                if timing:
                    t0 = self._toc("norm+quant", t0)

    # -- model ---------------------------------------------------------------------------
    def check_images(self, images: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        want = (cfg.in_chans, cfg.image_size, cfg.image_size)
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != want:
            raise TinyViTError(
                f"expected normalized images of shape (B, {', '.join(map(str, want))}), found "
                f"{getattr(images, 'shape', type(images).__name__)}; use tinyvit158.image to load and resize"
            )
        if not np.issubdtype(images.dtype, np.floating):
            raise TinyViTError(f"expected float images, found {images.dtype}; use tinyvit158.image to normalize")
        return np.ascontiguousarray(images, dtype=np.float32)

    def forward_features(self, images: np.ndarray) -> np.ndarray:
        """Normalized images [B, C, H, W] -> tokens [B, N+1, D] before the final norm."""
        return self._features(images).copy()

    def _features(self, images: np.ndarray) -> np.ndarray:
        """:meth:`forward_features` in this thread's workspace (overwritten by the next call)."""
        cfg = self.cfg
        images = self.check_images(images)
        B, N1, D = images.shape[0], cfg.num_tokens, cfg.dim
        ws = self._workspace.__dict__
        if ws.get("batch") != B:  # buffers fit one batch size; keep only the latest size's
            ws["batch"], ws["bufs"] = B, {}
        patches = patchify(images, cfg.patch_size).reshape(B * cfg.num_patches, cfg.patch_dim)
        emb = self.linear(patches, "patch_embed.proj", out="patches").reshape(B, cfg.num_patches, D)
        self._keep("patch_embed", emb)
        x = self._buf("x", (B, N1, D))
        x[:, 0] = self.cls_pos
        np.add(emb, self.p["pos_embed"][0, 1:], out=x[:, 1:])
        self._keep("tokens", x)
        x = x.reshape(B * N1, D)  # (T, D): every token of the batch is a row
        if self._fused:
            self._blocks_fused(x, B)
            return x.reshape(B, N1, D)
        for i in range(cfg.depth):
            blk = f"blocks.{i}"
            qkv = self.linear(x, f"{blk}.attn.qkv", norm=f"{blk}.norm1", out="qkv")  # (T, 3D)
            t0 = time.perf_counter() if self.timings is not None else 0.0
            made = {} if self.record is not None else None
            o = self.attn[i](qkv.reshape(B, N1, 3 * D), cfg.heads, self._buf("attn", (B, N1, D)), record=made)
            o = o.reshape(B * N1, D)
            if made:
                self.record.update({f"{blk}.attn.{k}": v for k, v in made.items()})
            if self.timings is not None:
                self._toc("attention", t0)
            self.linear(o, f"{blk}.attn.proj", residual=x)  # x += proj(o), in place
            h = self.linear(x, f"{blk}.mlp.fc1", norm=f"{blk}.norm2", out="hidden")  # (T, hidden)
            self.linear(h, f"{blk}.mlp.fc2", act=True, residual=x)  # x += fc2(gelu(h))
            self._keep(blk, x.reshape(B, N1, D))
        return x.reshape(B, N1, D)

    def forward_head(self, x: np.ndarray) -> np.ndarray:
        cls = np.ascontiguousarray(x[:, 0])
        if self.trace is not None:  # the final norm of every token, as the oracle records it
            self._keep("norm", self._ln(x.reshape(-1, x.shape[2]), "norm").reshape(x.shape))
        logits = self.linear(cls, "head", norm="norm")  # (B, classes)
        self._keep("logits", logits)
        return logits

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Normalized float images [B, C, H, W] -> float32 logits [B, classes]. Runs with
        the current Numba thread count or with 1, whichever is faster now (:class:`ThreadGovernor`)."""
        n = numba.get_num_threads()
        batch = images.shape[0] if isinstance(images, np.ndarray) and images.ndim else 0
        threads = self.governor.choose(batch, n)
        if threads != n:
            numba.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            logits = self.forward_head(self._features(images))
        finally:
            if threads != n:
                numba.set_num_threads(n)
        self.governor.record(batch, n, threads, time.perf_counter() - t0)
        return logits

    __call__ = forward
