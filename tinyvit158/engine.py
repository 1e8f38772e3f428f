"""The fast engine: the oracle's function, computed from packed ternary weights with
Numba int8 x ternary kernels (exact int32 accumulation); LayerNorm and attention in
float64 rounded once to float32, GELU and the rest in float32 (``kernels/rowops.py`` and
``kernels/attention.py`` say why).

Tokens of the whole batch are flattened to rows, ``T = B * (N + 1)``, for every linear
layer; attention runs per image. Each quantizer is fused into the step that produces its
input (LayerNorm -> int8, GELU -> int8, attention -> int8), so a block is:

    qkv = linear(x_q, s, qkv)                                          (T, 3D)
    o_q, s = attn[i].quantize(qkv)       (float64 or int8 attention, as the config says)
    x += linear(o_q, s, proj);    h_q, s = layernorm_quantize(x, norm2)
    g_q, s = gelu_quantize(linear(h_q, s, fc1))                        (T, hidden)
    x += linear(g_q, s, fc2);     x_q, s = layernorm_quantize(x, next block's norm1)

where ``x_q`` came from the previous block (the first block's from ``norm1``). BitLinear
blocks (``bitlinear_norm``) give each ternary layer its own LayerNorm before its codes.

One executor: a model is a :class:`Plan`, lists of :class:`Step` s, each a kernel bound to
this thread's buffers, built once per batch size (and kernel path) by the config's numeric
mode (the table :data:`NUMERICS`; in float numerics the blocks come from :data:`BLOCKS`,
keyed by their kind), and run back to back by :meth:`Engine._run`, which alone times,
records and traces. The VNNI and AVX2 paths bind raw kernels (each step one parallel
region, fc1 + GELU + codes one pass); the generic path binds the checked kernel functions.
In integer numerics (``numerics="integer"``) the same products feed the integer steps of
``kernels/intops.py``: every value from the first codes to the logits an integer, equal to
``integer.IntegerOracle``'s.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from tinyvit158 import integer
from tinyvit158.config import BLOCK_LINEARS
from tinyvit158.constants import INT_ONE, INT_SAT
from tinyvit158.errors import TinyViTError
from tinyvit158.integer import IntegerParams, to_q16
from tinyvit158.kernels import (
    PreparedTernary,
    attention_op,
    bind_bitlinear_quantize,
    bind_int_linear,
    bind_layernorm_quantize,
    bind_linear,
    bind_linear_gelu_quantize,
    bind_matmul,
    float_linear,
    gelu,
    gelu_quantize,
    kernel_path,
    layernorm,
    quantize_rows,
)
from tinyvit158.kernels.intops import (
    attention_codes,
    bind_layernorm_codes,
    bind_requantize,
    codes_rows,
    gelu_codes,
)
from tinyvit158.oracle import patchify
from tinyvit158.quant import ACT_QMAX
from tinyvit158.runtime import ThreadGovernor, quiet_spin
from tinyvit158.weights import Checkpoint, load_weights

PACKED_DEFAULT = True  # 2-bit weights, spread to bytes per job in cache: as fast as 1-byte ones in bench


@dataclass
class Step:
    """One kernel call of a forward pass, bound to its buffers.

    ``part``: what ``bench --layers`` times it as (None: not timed). ``reads``: (layer, its
    input codes), copied into ``Engine.record`` before the call. ``makes``: codes the call
    fills besides, by site (the int8 attention's q, k, v, p), copied after it. ``ends``:
    (stage, the array holding it) pairs, copied into ``Engine.trace`` after the call.
    """

    part: str | None
    fn: Callable
    args: tuple
    reads: tuple[str, np.ndarray] | None = None
    makes: dict[str, np.ndarray] = field(default_factory=dict)
    ends: tuple[tuple[str, np.ndarray], ...] = ()


@dataclass
class Plan:
    """A model's steps for one batch size: ``features`` leave the residual stream in
    ``tokens``, ``head`` the logits in ``logits`` (integer numerics: their Q16 integers in
    ``q16`` too)."""

    features: list[Step]
    head: list[Step]
    tokens: np.ndarray
    logits: np.ndarray
    q16: np.ndarray | None = None


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
        quiet_spin()
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
        self.blocks = "bitlinear" if cfg.bitlinear_norm else "ternary"  # the key into BLOCKS
        self.mode = NUMERICS[cfg.numerics]
        self.mode_params = self.mode.prepare(self, ckpt)
        self.record: dict[str, np.ndarray] | None = None  # layer -> int8 input codes (tests, ledger)
        self.timings: dict[str, float] | None = None  # part -> seconds (bench --layers)
        self.trace: dict[str, np.ndarray] | None = None  # stage -> output, the oracle's stage names
        self._workspace = threading.local()
        self.governor = ThreadGovernor()

    @classmethod
    def from_file(cls, path: str | os.PathLike, packed: bool = PACKED_DEFAULT) -> Engine:
        return cls(load_weights(path), packed)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight the engine holds: ternary layouts, scales, float tensors."""
        floats = sum(a.nbytes for a in self.p.values()) + sum(w.nbytes for w, _ in self.float.values())
        return floats + sum(w.nbytes for w in self.ternary.values())

    # -- buffers -------------------------------------------------------------------------
    def _batch(self, B: int) -> None:
        """Buffers (and plans) fit one batch size; keep only the latest size's."""
        ws = self._workspace.__dict__
        if ws.get("batch") != B:
            ws["batch"], ws["bufs"] = B, {}

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

    def _norm(self, name: str) -> tuple[np.ndarray, np.ndarray, float]:
        return self.p[f"{name}.weight"], self.p[f"{name}.bias"], self.cfg.norm_eps

    # -- the steps -----------------------------------------------------------------------
    def site(self, layer: str, src: np.ndarray, dest: np.ndarray, norm: str | None = None, act: bool = False,
             residual: bool = False) -> list[Step]:  # fmt: skip
        """Steps computing ``layer(act(norm(src)))`` (rows, float32) into ``dest``, or added
        to it when ``residual``: the input's codes (norm, GELU or plain quantizer, one
        kernel), then the product; for a float layer, float32 norm/GELU and ``x @ w + b``;
        with BitLinear norms, the layer's own LayerNorm before its codes."""
        part = layer.rsplit(".", 1)[-1] if layer.startswith("blocks.") else layer.split(".")[0]
        pre = "norm+quant" if norm else "gelu+quant" if act else "quant"
        ln = self._norm(norm) if norm else None
        if layer in self.float:
            x, steps = src, []
            if norm or act:
                x = self._buf(f"{layer}.in", src.shape)
                steps.append(Step(pre, _float_pre, (src, ln, act, x)))
            return steps + [Step(part, _float_linear_into, (x, *self.float[layer], dest, residual))]
        codes = self._codes_buf(src)
        if self.cfg.bitlinear_norm:  # the block's norm or GELU, the layer's own norm, codes: one pass
            first = Step(pre, *bind_bitlinear_quantize(src, ln, act, self._norm(f"{layer}.norm"), codes))
        elif norm:
            first = Step(pre, *bind_layernorm_quantize(src, *ln, codes))
        else:
            first = Step(pre, gelu_quantize if act else quantize_rows, (src, codes))
        linear = bind_linear(*codes, self.ternary[layer], dest, residual)
        return [first, Step(part, *linear, reads=(layer, codes[0]))]

    def _embed_steps(self, B: int) -> list[Step]:
        cfg = self.cfg
        Np, D = cfg.num_patches, cfg.dim
        images = self._buf("images", (B, cfg.in_chans, cfg.image_size, cfg.image_size))
        patches = self._buf("patches", (B * Np, cfg.patch_dim))
        emb = self._buf("emb", (B * Np, D))
        x = self._buf("x", (B, cfg.num_tokens, D))
        steps = [Step("patch_embed", _patchify_into, (images, cfg.patch_size, patches))]
        steps += self.site("patch_embed.proj", patches, emb)
        steps[-1].ends = (("patch_embed", emb.reshape(B, Np, D)),)
        pos = self.p["pos_embed"][0, 1:]
        return steps + [Step("patch_embed", _tokens_into, (emb.reshape(B, Np, D), self.cls_pos, pos, x),
                             ends=(("tokens", x),))]  # fmt: skip

    def _head_steps(self, B: int) -> list[Step]:
        cfg = self.cfg
        x = self._buf("x", (B, cfg.num_tokens, cfg.dim))
        cls, logits = self._buf("cls", (B, cfg.dim)), self._buf("logits", (B, cfg.num_classes))
        steps = [Step(None, np.copyto, (cls, x[:, 0]))]
        if self.trace is not None:  # the final norm of every token, as the oracle records it
            steps.append(Step(None, self._trace_norm, (x,)))
        steps += self.site("head", cls, logits, norm="norm")
        steps[-1].ends = (("logits", logits),)
        return steps

    def _trace_norm(self, x: np.ndarray) -> None:
        self.trace["norm"] = layernorm(x.reshape(-1, x.shape[2]), *self._norm("norm")).reshape(x.shape)

    def _plan(self, B: int) -> Plan:
        """This thread's steps for batch ``B``, bound once per kernel path and
        instrumentation, by the config's numerics (:data:`NUMERICS`): a forward runs them
        back to back, with no checks, lookups or argument building between them on the VNNI
        path (at batch 1 those took a fifth)."""
        bufs = self._workspace.__dict__["bufs"]
        key = "plan", kernel_path(), self.record is not None, self.trace is not None
        if key not in bufs:
            bufs[key] = self.mode.plan(self, B)
        return bufs[key]

    def _run(self, steps: list[Step]) -> None:
        """Run ``steps`` in order: the one place that times, records and traces."""
        record, timings, trace = self.record, self.timings, self.trace
        t0 = time.perf_counter() if timings is not None else 0.0
        for st in steps:
            if record is not None and st.reads is not None:
                record[st.reads[0]] = st.reads[1].copy()
            st.fn(*st.args)
            if record is not None and st.makes:
                record.update({site: codes.copy() for site, codes in st.makes.items()})
            if timings is not None:
                t1 = time.perf_counter()
                if st.part is not None:
                    timings[st.part] = timings.get(st.part, 0.0) + t1 - t0
                t0 = t1
            if trace is not None:
                trace.update({stage: a.copy() for stage, a in st.ends})

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
        images = self.check_images(images)
        B = images.shape[0]
        self._batch(B)
        plan = self._plan(B)
        np.copyto(self._buf("images", images.shape), images)
        self._run(plan.features)
        return plan.tokens

    def forward_head(self, x: np.ndarray) -> np.ndarray:
        """Tokens [B, N+1, D] (Q16 int64 in integer numerics) -> logits [B, classes]."""
        B = x.shape[0]
        self._batch(B)
        plan = self._plan(B)
        if x is not plan.tokens:
            np.copyto(plan.tokens, x)
        self._run(plan.head)
        return plan.logits.copy()

    def integers(self, images: np.ndarray) -> np.ndarray:
        """Integer numerics: normalized images -> the Q16 int64 logits (``forward`` gives
        their exact float64 view), as ``integer.IntegerOracle.integers``."""
        if self.cfg.numerics != "integer":
            raise TinyViTError(f"integers() is for numerics='integer'; this model's numerics are {self.cfg.numerics!r}")
        self.forward(images)
        return self._plan(images.shape[0]).q16.copy()

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Normalized float images [B, C, H, W] -> logits [B, classes] (float32; integer
        numerics: the Q16 integers' exact float64 view). Runs with
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


# -- the blocks, by kind ------------------------------------------------------------------
def _ternary_blocks(eng: Engine, B: int) -> list[Step]:
    """Every block, each step one kernel (the module docstring): the residual stream ``x``
    (T, D) updated in place; each quantizer fused into the step before it."""
    cfg = eng.cfg
    x3 = eng._buf("x", (B, cfg.num_tokens, cfg.dim))
    T, D = B * cfg.num_tokens, cfg.dim
    x = x3.reshape(T, D)
    codes = eng._codes_buf(x)
    attn = eng._buf("attn_codes", (T, D), np.int8), eng._buf("attn_scales", (T,))
    hidden = eng._buf("hidden_codes", (T, cfg.hidden_dim), np.int8), eng._buf("hidden_scales", (T,))
    qkv = eng._buf("qkv", (T, 3 * D))
    steps = [Step("norm+quant", *bind_layernorm_quantize(x, *eng._norm("blocks.0.norm1"), codes))]
    for i in range(cfg.depth):
        blk = f"blocks.{i}"
        w = {k: eng.ternary[f"{blk}.{k}"] for k in BLOCK_LINEARS}
        made = {} if eng.record is not None else None  # site suffix -> array the kernel fills
        attention = eng.attn[i].bind(qkv.reshape(B, -1, 3 * D), cfg.heads, codes=attn, record=made)
        steps += [
            Step("qkv", *bind_linear(*codes, w["attn.qkv"], qkv, False), reads=(f"{blk}.attn.qkv", codes[0])),
            Step("attention+quant", *attention, makes={f"{blk}.attn.{k}": v for k, v in (made or {}).items()}),
            Step("proj", *bind_linear(*attn, w["attn.proj"], x, True), reads=(f"{blk}.attn.proj", attn[0])),
            Step("norm+quant", *bind_layernorm_quantize(x, *eng._norm(f"{blk}.norm2"), codes)),
            Step("fc1+gelu+quant", *bind_linear_gelu_quantize(*codes, w["mlp.fc1"], *hidden),
                 reads=(f"{blk}.mlp.fc1", codes[0])),
            Step("fc2", *bind_linear(*hidden, w["mlp.fc2"], x, True), reads=(f"{blk}.mlp.fc2", hidden[0]),
                 ends=((blk, x3),)),
        ]  # fmt: skip
        if i + 1 < cfg.depth:
            steps.append(Step("norm+quant", *bind_layernorm_quantize(x, *eng._norm(f"blocks.{i + 1}.norm1"), codes)))
    return steps


def _bitlinear_blocks(eng: Engine, B: int) -> list[Step]:
    """Every block with BitLinear norms: each layer's input normalized and quantized in
    its own step (:meth:`Engine.site`), the attention's output in float32."""
    cfg = eng.cfg
    x3 = eng._buf("x", (B, cfg.num_tokens, cfg.dim))
    T, D = B * cfg.num_tokens, cfg.dim
    x = x3.reshape(T, D)
    qkv, o = eng._buf("qkv", (T, 3 * D)), eng._buf("attn", (B, cfg.num_tokens, D))
    hidden = eng._buf("hidden", (T, cfg.hidden_dim))
    steps = []
    for i in range(cfg.depth):
        blk = f"blocks.{i}"
        made = {} if eng.record is not None else None
        attention = eng.attn[i].bind(qkv.reshape(B, -1, 3 * D), cfg.heads, out=o, record=made)
        steps += eng.site(f"{blk}.attn.qkv", x, qkv, norm=f"{blk}.norm1")
        steps.append(Step("attention", *attention, makes={f"{blk}.attn.{k}": v for k, v in (made or {}).items()}))
        steps += eng.site(f"{blk}.attn.proj", o.reshape(T, D), x, residual=True)
        steps += eng.site(f"{blk}.mlp.fc1", x, hidden, norm=f"{blk}.norm2")
        steps += eng.site(f"{blk}.mlp.fc2", hidden, x, act=True, residual=True)
        steps[-1].ends = ((blk, x3),)
    return steps


BLOCKS: dict[str, Callable[[Engine, int], list[Step]]] = {"ternary": _ternary_blocks, "bitlinear": _bitlinear_blocks}


def _float_plan(eng: Engine, B: int) -> Plan:
    cfg = eng.cfg
    tokens = eng._buf("x", (B, cfg.num_tokens, cfg.dim))
    features = eng._embed_steps(B) + BLOCKS[eng.blocks](eng, B)
    return Plan(features, eng._head_steps(B), tokens, eng._buf("logits", (B, cfg.num_classes)))


# -- integer numerics: every value an integer (``integer.py`` states the rules) -------------
def _integer_prepare(eng: Engine, ckpt: Checkpoint) -> IntegerParams:
    return IntegerParams(ckpt, ternary_codes=False)  # the products read the engine's ternary layouts


def _integer_plan(eng: Engine, B: int) -> Plan:
    """Patch codes, the blocks (LayerNorm codes, qkv, attention to codes, proj into the
    residual stream, LayerNorm codes, fc1, GELU codes, fc2 into the stream), the final
    LayerNorm's codes of the class tokens and the head: Q16 int64 between the products."""
    cfg, ip = eng.cfg, eng.mode_params
    N1, D, H, Np = cfg.num_tokens, cfg.dim, cfg.hidden_dim, cfg.num_patches
    T = B * N1
    i64 = np.int64

    def codes(rows: int, width: int, name: str = "") -> tuple[np.ndarray, np.ndarray]:
        q = eng._buf(f"icodes{name}{rows}x{width}", (rows, width), np.int8)
        return q, eng._buf(f"iR{name}{rows}", (rows,), i64)

    def site(layer: str, src: tuple, dest: np.ndarray, part: str, stage: str | None = None, residual=None,
             gelu=None, norm=None) -> list[Step]:  # fmt: skip
        """Steps of ``layer`` of codes ``src`` into ``dest`` (and added into ``residual``,
        clamped, then with ``norm`` = (a LayerNorm's name, codes) that norm's codes of the
        stream; or, with ``gelu`` codes, then their i-GELU's codes): one pass where the kernel
        path has one and no trace wants ``dest``, else the product, the requantization and
        the norm or i-GELU codes, each bound once."""
        wq, g, e, bias = ip.linear[layer]
        ends = () if stage is None else ((stage, dest.reshape(B, -1, dest.shape[1])),)
        w = eng.ternary.get(layer)
        if w is None:  # int8 weights (a float layer's: patch embedding or head, never added to the stream)
            args = (*src, wq, g, e, bias, dest)
            return [Step(part, _int8_linear, args, reads=(layer, src[0]), ends=ends)]
        ln = None if norm is None else (*ip.norms[norm[0]], ip.eps, norm[1])
        fused = None if eng.trace is not None else bind_int_linear(*src, w, g, e, bias, dest, residual, gelu, ln)
        if fused is not None:
            name = "fc1+gelu+quant" if gelu is not None else part if norm is None else f"{part}+norm+quant"
            return [Step(name, *fused, reads=(layer, src[0]))]
        acc = eng._buf(f"iacc{dest.shape[0]}x{dest.shape[1]}", dest.shape, np.int32)
        steps = [
            Step(part, *bind_matmul(src[0], w, acc), reads=(layer, src[0])),
            Step(part, *bind_requantize(acc, src[1], g, e, bias, dest, residual), ends=ends),
        ]
        if gelu is not None:
            steps.append(Step("gelu+quant", gelu_codes, (dest, ACT_QMAX, gelu)))
        if norm is not None:
            steps.append(norm_step(residual, *norm))
        return steps

    def norm_step(src: np.ndarray, name: str, dest: tuple) -> Step:
        return Step("norm+quant", *bind_layernorm_codes(src, *ip.norms[name], ip.eps, ACT_QMAX, dest))

    images = eng._buf("images", (B, cfg.in_chans, cfg.image_size, cfg.image_size))
    i32 = np.int32  # Q16 activations: every one is saturated at |v| <= SAT < 2**24
    x3 = eng._buf("xi", (B, N1, D), i32)
    x = x3.reshape(T, D)
    emb, qkv = eng._buf("embi", (B * Np, D), i32), eng._buf("qkvi", (T, 3 * D), i32)
    out, hidden = eng._buf("outi", (T, D), i32), eng._buf("hiddeni", (T, H), i32)
    att = eng._buf("atti", (T, D), i32)  # the attention's Q16 output, before its codes
    patches, cx, ch = codes(B * Np, cfg.patch_dim), codes(T, D), codes(T, H)
    ca = codes(T, D, "attn")  # the attention's codes (proj's input), apart from the norms' codes
    steps = [
        Step("patch_embed", _int_patch_codes, (images, cfg.patch_size, *patches)),
        *site("patch_embed.proj", patches, emb, "patch_embed", "patch_embed"),
        Step("patch_embed", _int_tokens, (emb.reshape(B, Np, D), ip.cls_token[0], ip.pos_embed[0], x3)),
        norm_step(x, "blocks.0.norm1", cx),
    ]
    bits, pbits, clip = cfg.attention_bits, cfg.attention_prob_bits, cfg.attention_prob_clip
    for i in range(cfg.depth):
        blk = f"blocks.{i}"
        after = (f"blocks.{i + 1}.norm1", cx) if i + 1 < cfg.depth else None  # the next block's input codes
        steps += [
            *site(f"{blk}.attn.qkv", cx, qkv, "qkv", f"{blk}.attn.qkv"),
            Step("attention+quant", attention_codes, (qkv, B, cfg.heads, bits, pbits, clip, ca, att)),
            *site(f"{blk}.attn.proj", ca, out, "proj", f"{blk}.attn.proj", residual=x, norm=(f"{blk}.norm2", cx)),
            *site(f"{blk}.mlp.fc1", cx, hidden, "fc1", f"{blk}.mlp.fc1", gelu=ch),
            *site(f"{blk}.mlp.fc2", ch, out, "fc2", f"{blk}.mlp.fc2", residual=x, norm=after),
        ]
        steps[-1].ends += ((blk, x3),)
    cls, ccls = eng._buf("clsi", (B, D), i32), codes(B, D, "cls")
    q16, logits = eng._buf("q16", (B, cfg.num_classes), i64), eng._buf("logitsi", (B, cfg.num_classes), np.float64)
    head = [
        Step(None, np.copyto, (cls, x3[:, 0])),
        norm_step(cls, "norm", ccls),
        *site("head", ccls, q16, "head"),
        Step(None, np.divide, (q16, float(INT_ONE), logits), ends=(("logits", q16),)),
    ]
    return Plan(steps, head, x3, logits, q16)


def _int_patch_codes(images, p, q, R) -> None:
    flat = patchify(images, p).reshape(q.shape)
    codes_rows(to_q16(flat), ACT_QMAX, (q, R))


def _int_tokens(emb, cls, pos, x) -> None:
    x[:, 0] = np.clip(cls + pos[0], -INT_SAT, INT_SAT)
    np.clip(emb + pos[1:], -INT_SAT, INT_SAT, out=x[:, 1:])


def _int8_linear(q, R, w, g, e, bias, dest) -> None:
    """A layer of int8 weights (a float layer's) on codes ``q`` standing for ``q R / 127``, by the reference."""
    np.copyto(dest, integer.linear(q, R, w, g, e, bias).reshape(dest.shape))


@dataclass(frozen=True)
class Numerics:
    """A numeric mode: what it prepares from the checkpoint, and its steps for a batch size."""

    prepare: Callable
    plan: Callable[[Engine, int], Plan]


NUMERICS = {
    "float": Numerics(lambda eng, ckpt: None, _float_plan),
    "integer": Numerics(_integer_prepare, _integer_plan),
}


# -- the small steps the kernels module has no kernel for ------------------------------------
def _patchify_into(images: np.ndarray, p: int, out: np.ndarray) -> None:
    np.copyto(out, patchify(images, p).reshape(out.shape))


def _tokens_into(emb: np.ndarray, cls_pos: np.ndarray, pos: np.ndarray, x: np.ndarray) -> None:
    x[:, 0] = cls_pos
    np.add(emb, pos, out=x[:, 1:])


def _float_pre(src: np.ndarray, ln, act: bool, out: np.ndarray) -> None:
    """``act(norm(src))`` in float32 into ``out`` (``ln``: (weight, bias, eps) or None)."""
    x = layernorm(src, *ln) if ln is not None else src
    np.copyto(out, gelu(x) if act else x)


def _float_linear_into(x, w_t, b, dest: np.ndarray, residual: bool) -> None:
    y = float_linear(x, w_t, b)
    if residual:
        dest += y
    else:
        np.copyto(dest, y)
