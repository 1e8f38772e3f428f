"""Linear layers: int8 x ternary products with exact int32 accumulation, dequantized in
the store; fc1 + GELU + codes; the float layers' kernel; the kernel path; the references.

``acc[t, n] = sum_k x_q[t, k] * w[n, k]`` with ``x_q`` in [-127, 127] and ``w`` in
{-1, 0, +1}: every product is an addition, a subtraction or nothing, and
``|acc| <= 127 * K``, so int32 is exact for any K below 2**24.

The kernel paths, a table (:data:`PATH_FEATURES`): ``generic`` (``kernels/portable.py``:
a 6-token x 16-channel tile in LLVM's portable float32 vectors, exact because every
partial sum is an integer below 2**24 for K <= 132,104; ``_matmul_dot4`` beyond that bound
and under NUMBA_DISABLE_JIT=1), ``avx2`` (``kernels/avx2.py``: ``vpmaddubsw`` +
``vpmaddwd``) and ``vnni`` (``kernels/vnni.py``: ``vpdpbusd``). The last two share the
VNNI weight layout (:data:`_TILED`). ``TINYVIT158_KERNEL=auto`` (the default) takes the
first of :data:`AUTO_ORDER` whose instructions llvmlite reports on the host (with Numba's
JIT on); a path's name forces it. Every path is tested against the same references.
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
from llvmlite import binding

from tinyvit158.errors import TinyViTError
from tinyvit158.kernels import avx2, portable, vnni
from tinyvit158.kernels.intops import requant_scales
from tinyvit158.kernels.jit import PYTHON, check_f32_rows, check_out, codes_out, pjit
from tinyvit158.kernels.rowops import gelu_quantize
from tinyvit158.packing import unpack
from tinyvit158.quant import ACT_QMAX

KERNEL_ENV = "TINYVIT158_KERNEL"
# each path: the CPU features (llvmlite's names) its instructions need
PATH_FEATURES = {"generic": (), "avx2": ("avx2",), "vnni": ("avx512f", "avx512bw", "avx512vnni")}
PATHS = tuple(PATH_FEATURES)
AUTO_ORDER = ("vnni", "avx2", "generic")  # fastest first
_TILED = {
    "vnni": vnni.linear_tiles,
    "avx2": avx2.linear_tiles,
}  # the paths on the VNNI layout: their kernels, one signature


@functools.cache
def cpu_has(path: str) -> bool:
    """Whether this CPU (as llvmlite sees it) runs ``path``'s instructions and Numba compiles for it."""
    if not PATH_FEATURES[path]:
        return True
    features = binding.get_host_cpu_features()
    return all(features.get(f, False) for f in PATH_FEATURES[path]) and not numba.config.DISABLE_JIT


def cpu_has_vnni() -> bool:
    """Whether this CPU runs the AVX-512 VNNI path."""
    return cpu_has("vnni")


def kernel_path() -> str:
    """The kernel path in use: ``$TINYVIT158_KERNEL`` (auto or a path's name), auto by default."""
    return _resolve_path(os.environ.get(KERNEL_ENV, "auto"))


@functools.cache
def _resolve_path(setting: str) -> str:  # cached: every linear layer asks, ~1 us a time
    want = setting.strip().lower() or "auto"
    if want == "auto":
        return next(p for p in AUTO_ORDER if cpu_has(p))
    if want not in PATHS:
        raise TinyViTError(f"{KERNEL_ENV}={want!r}; use auto, {', '.join(PATHS)}")
    if not cpu_has(want):
        raise TinyViTError(
            f"{KERNEL_ENV}={want}, but this CPU lacks {', '.join(PATH_FEATURES[want])} (or NUMBA_DISABLE_JIT "
            "is set); use auto or generic"
        )
    return want


class PreparedTernary:
    """A ternary linear layer's weights, in the layouts the kernels use.

    Attributes
    ----------
    codes : int8 ndarray (N, K)
        Weights in {-1, 0, +1}, row-major: the generic kernel's layout and the references'.
    vnni : kernels.vnni.VNNIWeights
        The VNNI tile layout, built on first use: one byte per weight, or two bits per weight
        when ``packed`` (the tile then spreads them to bytes as it loads them).
    scale : float32 ndarray (N,)
        Per-output-channel weight scale gamma.
    bias : float32 ndarray (N,) or None

    :meth:`compact` keeps only the VNNI layout; ``codes`` is then rebuilt from it on demand.
    """

    def __init__(self, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None, packed: bool = False):
        codes = np.ascontiguousarray(codes, dtype=np.int8)
        if codes.ndim != 2:
            raise TinyViTError(f"ternary weights must be 2-D (out, in), found shape {codes.shape}")
        n = codes.shape[0]
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        if scale.shape != (n,):
            raise TinyViTError(f"weight scale must have shape ({n},), found {scale.shape}")
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=np.float32)
            if bias.shape != (n,):
                raise TinyViTError(f"bias must have shape ({n},), found {bias.shape}")
        self._codes, self.scale, self.bias = codes, scale, bias
        self.shape = codes.shape
        self.packed = packed
        self._vnni = self._portable = None

    @property
    def codes(self) -> np.ndarray:
        if self._codes is None:
            self._codes = (self._vnni or self._portable).codes()
        return self._codes

    @property
    def vnni(self) -> vnni.VNNIWeights:
        if self._vnni is None or self._vnni.packed != self.packed:
            self._vnni = vnni.VNNIWeights(self.codes, self.packed)
        return self._vnni

    @property
    def portable(self) -> portable.PortableWeights:
        if self._portable is None:
            self._portable = portable.PortableWeights(self.codes)
        return self._portable

    def compact(self, path: str = "vnni") -> None:
        """Keep only the layout the kernel ``path`` reads (the VNNI one, for the VNNI and
        AVX2 paths: a quarter of the int8 codes when packed; the generic tile's: one byte a weight)."""
        if path in _TILED:
            self.vnni  # noqa: B018 - builds it
            self._portable = None
        elif _use_portable(self.in_features):
            self.portable  # noqa: B018
            self._vnni = None
        else:
            return
        self._codes = None

    @property
    def bias_args(self) -> tuple[np.ndarray, bool]:
        """(bias, has_bias) as the kernels take them: without a bias, the scale array stands
        in (a float32 array of the right length the kernels never read)."""
        return (self.bias, True) if self.bias is not None else (self.scale, False)

    @property
    def nbytes(self) -> int:
        """Bytes held now: whichever layouts exist, the scales and the bias."""
        held = [a for a in (self._codes, self.scale, self.bias) if a is not None]
        layouts = [w.nbytes for w in (self._vnni, self._portable) if w is not None]
        return sum(a.nbytes for a in held) + sum(layouts)

    @classmethod
    def from_packed(cls, packed: np.ndarray, k: int, fmt: str, scale, bias=None) -> PreparedTernary:
        return cls(unpack(packed, k, fmt), scale, bias)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


def _use_portable(k: int) -> bool:
    """The generic path's register tile (``kernels/portable.py``): needs compiled code (its
    vector intrinsics) and K small enough for exact float32 sums."""
    return not numba.config.DISABLE_JIT and k <= portable.K_EXACT


def _check_x(x_q: np.ndarray, w: PreparedTernary) -> np.ndarray:
    if not isinstance(x_q, np.ndarray) or x_q.dtype != np.int8 or x_q.ndim != 2:
        raise TinyViTError(
            "expected int8 activations of shape (tokens, in_features), found "
            f"{getattr(x_q, 'dtype', type(x_q).__name__)} {getattr(x_q, 'shape', '')}; "
            "quantize them with quant.quantize_activations"
        )
    if x_q.shape[1] != w.in_features:
        raise TinyViTError(f"activations have {x_q.shape[1]} features, weights expect {w.in_features}")
    return np.ascontiguousarray(x_q)


@numba.njit(cache=True)
def _matmul_loops(x_q, w):
    """Readable reference: for each output, add the inputs where w = +1, subtract where -1.

    Parameters
    ----------
    x_q : int8 (T, K)
    w : int8 (N, K), values in {-1, 0, +1}

    Returns
    -------
    int32 (T, N), accumulated in int64; |acc| <= 127 K fits int32 for any K below 2**24.
    """
    T, K = x_q.shape
    N = w.shape[0]
    out = np.zeros((T, N), dtype=np.int32)
    for t in range(T):
        for n in range(N):
            acc = np.int64(0)  # int64 also when run as Python (NUMBA_DISABLE_JIT=1)
            for k in range(K):
                if w[n, k] == 1:
                    acc += np.int64(x_q[t, k])
                elif w[n, k] == -1:
                    acc -= np.int64(x_q[t, k])
            out[t, n] = acc
    return out


def matmul_ref(x_q: np.ndarray, w: PreparedTernary) -> np.ndarray:
    """Reference int8 x ternary product: int32 ``(T, N)`` (readable loops, slow)."""
    return _matmul_loops(_check_x(x_q, w), w.codes)


@numba.njit(parallel=True, cache=True)
def _matmul_dot4(x_q, w):
    """Fast generic kernel: four dot products over K per pass, int32 lanes.

    Parameters
    ----------
    x_q : int8 (T, K)
    w : int8 (N, K), values in {-1, 0, +1}

    Returns
    -------
    int32 (T, N); exact because |acc| <= 127 K < 2**31.
    """
    T, K = x_q.shape
    N = w.shape[0]
    out = np.empty((T, N), dtype=np.int32)
    n4 = N - N % 4
    for t in numba.prange(T):
        xr = x_q[t]
        for n in range(0, n4, 4):
            w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
            s0 = np.int32(0)
            s1 = np.int32(0)
            s2 = np.int32(0)
            s3 = np.int32(0)
            for k in range(K):
                xv = np.int32(xr[k])
                s0 = np.int32(s0 + xv * np.int32(w0[k]))
                s1 = np.int32(s1 + xv * np.int32(w1[k]))
                s2 = np.int32(s2 + xv * np.int32(w2[k]))
                s3 = np.int32(s3 + xv * np.int32(w3[k]))
            out[t, n] = s0
            out[t, n + 1] = s1
            out[t, n + 2] = s2
            out[t, n + 3] = s3
        for n in range(n4, N):
            s = np.int32(0)
            for k in range(K):
                s = np.int32(s + np.int32(xr[k]) * np.int32(w[n, k]))
            out[t, n] = s
    return out


def matmul(x_q: np.ndarray, w: PreparedTernary, path: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Fast int8 x ternary product: int32 ``(T, N)``, bit-identical to :func:`matmul_ref`,
    into ``out`` (C-contiguous int32 (T, N)) when given.

    ``path``: one of :data:`PATHS`; default :func:`kernel_path`.
    """
    x_q = _check_x(x_q, w)
    out = check_out(out, (x_q.shape[0], w.out_features), np.int32, "out")
    path = path or kernel_path()
    if path in _TILED:
        return vnni.tiled_matmul(_TILED[path], x_q, w.vnni, out)
    if _use_portable(w.in_features):
        return portable.matmul(x_q, w.portable, out)
    out[...] = _matmul_dot4(x_q, w.codes)
    return out


def bind_matmul(x_q: np.ndarray, w: PreparedTernary, out: np.ndarray):
    """``(kernel, args)`` whose call computes :func:`matmul` of these (checked) arrays into
    ``out``, for a caller that repeats it on buffers it refills (the integer engine's plan):
    the tiled paths' raw kernel where it reads ``x_q`` in place (K % 4 == 0; at batch 1 the
    wrapper's checks took a third of a small layer's call), else :func:`matmul`."""
    x_q = _check_x(x_q, w)
    out = check_out(out, (x_q.shape[0], w.out_features), np.int32, "out")
    path = kernel_path()
    if path in _TILED and w.in_features % 4 == 0:
        return vnni.bind_tiled_matmul(_TILED[path], x_q, w.vnni, out)
    return matmul, (x_q, w, path, out)


# the paths with a one-pass integer layer kernel (product, requantization, then a residual
# add and norm codes, or i-GELU codes): the kernel, of one signature (``avx2.int_rows``)
INT_ROWS = {"vnni": vnni.int_rows, "avx2": avx2.int_rows}


def bind_int_linear(x_q: np.ndarray, R: np.ndarray, w: PreparedTernary, g, e, bias, out=None, residual=None,
                    gelu=None, norm=None):  # fmt: skip
    """``(kernel, args)`` of the one-pass integer layer on the path in use, or None where the
    path has none (then: :func:`bind_matmul` and ``intops.bind_requantize``, the same integers):
    codes ``x_q`` standing for ``x_q R / 127`` -> Q16 into ``out``, added into ``residual``
    when given, then with ``norm`` = (G, B, E, (int8 codes, int64 R)) the LayerNorm codes of
    the result rows; or, with ``gelu`` = (int8 codes, int64 R), the i-GELU's codes only (``out``
    is then not written). Arrays of the wrong shape or type are refused (TinyViTError)."""
    rows = INT_ROWS.get(kernel_path())
    if rows is None or w.out_features % vnni.NC or w.in_features % 4 or PYTHON:
        return None
    x_q = _check_x(x_q, w)
    T, N = x_q.shape[0], w.out_features
    has_bias, has_res, has_gelu, has_norm = bias is not None, residual is not None, gelu is not None, norm is not None
    if (not has_gelu and out is None) or (has_gelu and (has_res or has_norm)):
        raise TinyViTError("bind_int_linear takes out (with residual and norm optional) or gelu codes alone")
    R = check_out(R, (T,), np.int64, "row scales R")
    no_codes = np.empty((1, 1), np.int8), np.empty(1, np.int64)
    q, Rq = _codes_pair(gelu, T, N) if has_gelu else no_codes
    out = check_out(out, (T, N), np.int32, "out") if not has_gelu else np.empty((1, 1), np.int32)
    res = check_out(residual, (T, N), np.int32, "residual") if has_res else out
    Gn, Bn, E, (qn, Rn) = norm if has_norm else (g, g, 0, no_codes)
    if has_norm:
        qn, Rn = _codes_pair((qn, Rn), T, N)
    B = bias if has_bias else g
    x, K = vnni.prepared(x_q, w.vnni)
    c = requant_scales(g, e)
    return rows, (x, w.vnni.wl, K, T, N, w.vnni.packed, numba.get_num_threads(), R, c, g, e, B,
                  B.astype(np.float64), has_bias, out, res, has_res, has_gelu, np.int64(ACT_QMAX), q, Rq, has_norm,
                  np.asarray(Gn, np.float64), np.asarray(Bn, np.float64), np.int64(E), qn, Rn)  # fmt: skip


def _codes_pair(codes, T: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (int8 (T, N)) and their R (int64 (T,)), checked."""
    q, R = codes
    return check_out(q, (T, N), np.int8, "codes"), check_out(R, (T,), np.int64, "codes' R")


def _check_sx(s_x: np.ndarray, x_q: np.ndarray) -> np.ndarray:
    if not isinstance(s_x, np.ndarray) or s_x.dtype != np.float32 or s_x.shape != x_q.shape[:1]:
        raise TinyViTError(
            f"expected float32 scales of shape ({x_q.shape[0]},), found "
            f"{getattr(s_x, 'dtype', type(s_x).__name__)} {getattr(s_x, 'shape', '')}"
        )
    return s_x


def linear_ref(x_q: np.ndarray, s_x: np.ndarray, w: PreparedTernary) -> np.ndarray:
    """Reference ternary linear: ``acc * s_x[t] * scale[n] + bias[n]`` in float32."""
    acc = matmul_ref(x_q, w)
    y = acc.astype(np.float32) * _check_sx(s_x, x_q)[:, None] * w.scale[None, :]
    return y + w.bias if w.bias is not None else y


def fits_vnni_tiles(w: PreparedTernary) -> bool:
    """Whether the VNNI kernels read this layer's activations in place and store its
    outputs from whole tiles (K % 4 == 0, N % 48 == 0: every ViT layer but a classifier)."""
    return w.in_features % 4 == 0 and w.out_features % vnni.NC == 0


def bind_linear(x_q: np.ndarray, s_x: np.ndarray, w: PreparedTernary, out: np.ndarray, accumulate: bool):
    """``(kernel, args)`` whose call computes :func:`linear` of these (checked) arrays into
    ``out`` (added to it when ``accumulate``), for a caller that repeats it on buffers it
    refills (the engine's plan). The VNNI and AVX2 paths bind their raw kernel once (K % 4
    == 0 and N % 48 == 0: no checks or argument building per call); others bind :func:`linear`."""
    path = kernel_path()
    if path in _TILED and fits_vnni_tiles(w):
        return vnni.bind_tiled(_TILED[path], x_q, s_x, w.vnni, w.scale, *w.bias_args, out, accumulate)
    return linear, (x_q, s_x, w, None, out, None) if accumulate else (x_q, s_x, w, None, None, out)


def linear(
    x_q: np.ndarray,
    s_x: np.ndarray,
    w: PreparedTernary,
    path: str | None = None,
    residual: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Fast ternary linear, float32 ``(T, N)``, bit-identical to :func:`linear_ref`.

    ``residual``: a C-contiguous float32 ``(T, N)`` array the result is added to, in place
    (``residual + linear(...)``, the same float32 addition), and returned. ``out``: a
    C-contiguous float32 ``(T, N)`` array to write the result into (not with ``residual``).
    """
    x_q = _check_x(x_q, w)
    s_x = _check_sx(s_x, x_q)
    shape = (x_q.shape[0], w.out_features)
    if residual is not None and out is not None:
        raise TinyViTError("linear takes residual or out, not both")
    accumulate = residual is not None
    out = check_out(residual, shape, np.float32, "residual") if accumulate else check_out(out, shape, np.float32, "out")
    path, n = path or kernel_path(), w.out_features
    if path in _TILED and n % vnni.NC == 0:  # every ViT width: dequantized in the kernel's stores
        fn, args = vnni.bind_tiled(_TILED[path], x_q, s_x, w.vnni, w.scale, *w.bias_args, out, accumulate)
        fn(*args)
        return out
    if path == "generic" and n % portable.NC == 0 and _use_portable(w.in_features):
        return portable.linear(x_q, s_x, w.portable, w.scale, *w.bias_args, out, accumulate)
    y = matmul(x_q, w, path).astype(np.float32) * s_x[:, None] * w.scale[None, :]  # linear_ref's operations
    y = y + w.bias if w.bias is not None else y
    if accumulate:
        out += y
    else:
        out[...] = y
    return out


# the paths with a one-pass fc1 + GELU + codes kernel: the kernel, of one signature (``vnni.linear_rows``)
_FUSED_FC1 = {"vnni": vnni.linear_rows, "avx2": avx2.linear_rows}


def _fused(w: PreparedTernary):
    """The one-pass kernel for ``w`` on the path in use, or None (then: the steps)."""
    fused = _FUSED_FC1.get(kernel_path())
    return fused if fused is not None and w.out_features % vnni.NC == 0 and not PYTHON else None


def bind_linear_gelu_quantize(x_q, s_x, w: PreparedTernary, q, s):
    """``(kernel, args)`` whose call computes :func:`linear_gelu_quantize` into ``(q, s)``,
    for a caller that repeats it (the engine's plan; see :func:`bind_linear`): the
    one-pass kernel where the path has one, else the checked function."""
    fused = _fused(w)
    if fused is not None:
        return vnni.bind_rows(fused, x_q, s_x, w.vnni, w.scale, *w.bias_args, q, s)
    return linear_gelu_quantize, (x_q, s_x, w, (q, s))


def linear_gelu_quantize(x_q: np.ndarray, s_x: np.ndarray, w: PreparedTernary, out=None):
    """``gelu_quantize(linear(x_q, s_x, w))``, bit-identical, in one pass on the VNNI and AVX2 paths:
    int8 codes (T, N) and float32 scales (T,), into ``out`` (a (codes, scales) pair) when given."""
    x_q = _check_x(x_q, w)
    s_x = _check_sx(s_x, x_q)
    q, s = codes_out((x_q.shape[0], w.out_features), out)
    fused = _fused(w)
    if fused is None:
        return gelu_quantize(linear(x_q, s_x, w), (q, s))
    fn, args = vnni.bind_rows(fused, x_q, s_x, w.vnni, w.scale, *w.bias_args, q, s)
    fn(*args)
    return q, s


@pjit
def _float_linear(x, w_t, b):
    T, K = x.shape
    N = w_t.shape[1]
    out = np.empty((T, N), dtype=np.float32)
    for t in numba.prange(T):
        acc = b.copy()
        for k in range(K):
            xv = x[t, k]
            for n in range(N):
                acc[n] += xv * w_t[k, n]
        out[t] = acc
    return out


def float_linear(x: np.ndarray, w_t: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x @ w_t + b`` in float32 for the float layers (head, optional patch embedding).

    A Numba loop rather than BLAS: these layers are small, and OpenBLAS's threads keep
    spinning for a while after each call, stealing both cores from the Numba kernels that
    follow (measured: int8 kernels slowed 10-100x right after an sgemm).
    """
    x = check_f32_rows(x, "float_linear")
    if w_t.shape[0] != x.shape[1] or b.shape != (w_t.shape[1],):
        raise TinyViTError(f"float_linear: x {x.shape}, weight {w_t.shape}, bias {b.shape} do not fit")
    return _float_linear(x, np.ascontiguousarray(w_t, np.float32), np.ascontiguousarray(b, np.float32))
