import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kernel_paths import KERNEL_PATHS, kernel
from strategies import int8_TK_ternary_NK, small_int8_TK_ternary_NK

from tinyvit158 import oracle
from tinyvit158.errors import TinyViTError
from tinyvit158.kernels import (
    PATH_FEATURES,
    PATHS,
    PreparedTernary,
    attention,
    attention_quantize,
    attention_ref,
    cpu_has,
    cpu_has_vnni,
    gelu,
    gelu_quantize,
    layernorm,
    layernorm_quantize,
    linear,
    linear_gelu_quantize,
    linear_ref,
    matmul,
    matmul_ref,
    quantize_rows,
)
from tinyvit158.packing import pack
from tinyvit158.quant import quantize_activations

# float32 kernels vs float64 math: a few float32 ulps (2**-23 = 1.2e-7 relative) of the output
# scale; the row statistics are accumulated in float64 so the error does not grow with K.
F32_RTOL = 1e-6
# attention sums N products in float32 twice (scores, then p @ v): allow ~N ulps
ATTN_ATOL = 2e-6


def int64_reference(x_q, w):
    return x_q.astype(np.int64) @ w.astype(np.int64).T


def random_layer(rng, t, k, n, packed):
    """int8 activations (t, k) with their scales, and a random ternary layer (n, k) with bias."""
    x_q = rng.integers(-127, 128, (t, k)).astype(np.int8)
    s_x = (rng.random(t) * 0.05).astype(np.float32)
    w = PreparedTernary(
        rng.integers(-1, 2, (n, k)).astype(np.int8), rng.random(n).astype(np.float32),
        rng.standard_normal(n).astype(np.float32), packed=packed,
    )  # fmt: skip
    return x_q, s_x, w


def prepared(w, seed=0, path="generic"):
    rng = np.random.default_rng(seed)
    n = w.shape[0]
    scale, bias = rng.random(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    return PreparedTernary(w, scale, bias, packed=kernel(path)[1])


@pytest.mark.parametrize("path", KERNEL_PATHS)
@given(xw=int8_TK_ternary_NK())
def test_matmul_fast_equals_reference_equals_int64(path, xw):
    x_q, w = xw
    pw = prepared(w, path=path)
    expected = int64_reference(x_q, w)
    assert np.abs(expected).max(initial=0) <= 127 * w.shape[1]
    ref = matmul_ref(x_q, pw)
    fast = matmul(x_q, pw, kernel(path)[0])
    assert ref.dtype == fast.dtype == np.int32
    assert np.array_equal(ref, expected)
    assert np.array_equal(fast, expected)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@given(xw=small_int8_TK_ternary_NK())
def test_matmul_small_elementwise(path, xw):
    x_q, w = xw
    pw = prepared(w, path=path)
    assert np.array_equal(matmul(x_q, pw, kernel(path)[0]), int64_reference(x_q, w))
    assert np.array_equal(matmul_ref(x_q, pw), int64_reference(x_q, w))


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("t", [1, 6, 7, 8, 9, 65])
@pytest.mark.parametrize("n", [1, 47, 48, 49, 577])
@pytest.mark.parametrize("k", [1, 3, 4, 5, 193])
def test_tile_edges(path, t, n, k):
    # the VNNI tile is 8 tokens x 48 channels x 4 inputs, the generic one 6 tokens x 16
    # channels: shapes on, below and above each edge
    rng = np.random.default_rng(t * 10_000 + n * 10 + k)
    x = rng.integers(-127, 128, size=(t, k)).astype(np.int8)
    w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    pw = prepared(w, path=path)
    pw.compact(kernel(path)[0])  # what the engine keeps: the kernel layout alone (codes rebuilt for the reference)
    assert np.array_equal(matmul(x, pw, kernel(path)[0]), int64_reference(x, w))
    s_x = rng.random(t).astype(np.float32)
    assert np.array_equal(linear(x, s_x, pw, kernel(path)[0]), linear_ref(x, s_x, pw))
    residual = rng.standard_normal((t, n)).astype(np.float32)
    expected = residual + linear_ref(x, s_x, pw)  # the same float32 addition, in place below
    out = linear(x, s_x, pw, kernel(path)[0], residual=residual)
    assert out is residual and np.array_equal(out, expected)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("fmt", ["ternary2", "ternary3"])
@pytest.mark.parametrize("k", [1, 7, 192, 1000])
def test_matmul_extremes_from_packed(path, fmt, k):
    rng = np.random.default_rng(k)
    w = rng.integers(-1, 2, size=(9, k)).astype(np.int8)
    w[0] = 1  # all +1: acc = 127 * K for an all-127 row
    w[1] = -1
    w[2] = 0  # a whole row of zero weights
    x = rng.integers(-127, 128, size=(6, k)).astype(np.int8)
    x[0], x[1], x[2] = 127, -127, 0
    pw = PreparedTernary.from_packed(pack(w, fmt), k, fmt, np.ones(9, np.float32))
    pw.packed = kernel(path)[1]
    out = matmul(x, pw, kernel(path)[0])
    assert np.array_equal(out, int64_reference(x, w))
    assert out[0, 0] == 127 * k and out[1, 0] == -127 * k and out[0, 1] == -127 * k
    assert np.all(out[:, 2] == 0) and np.all(out[2] == 0)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@given(xw=int8_TK_ternary_NK(max_k=300, max_n=300), bias=st.booleans())
def test_linear_fast_equals_reference_bitwise(path, xw, bias):
    x_q, w = xw
    rng = np.random.default_rng(0)
    pw = PreparedTernary(
        w, rng.random(w.shape[0]).astype(np.float32), rng.random(w.shape[0]).astype(np.float32) if bias else None
    )
    s_x = rng.random(x_q.shape[0]).astype(np.float32)
    fast, ref = linear(x_q, s_x, pw, path), linear_ref(x_q, s_x, pw)
    assert fast.dtype == np.float32
    assert np.array_equal(fast, ref)  # same float32 operations in the same order
    into = np.full(ref.shape, np.nan, dtype=np.float32)  # every element must be written
    assert linear(x_q, s_x, pw, path, out=into) is into and np.array_equal(into, ref)
    exact = int64_reference(x_q, w) * s_x[:, None].astype(np.float64) * pw.scale.astype(np.float64)
    exact = exact + (pw.bias if bias else 0)
    np.testing.assert_allclose(fast, exact, rtol=F32_RTOL * 4, atol=F32_RTOL * np.abs(exact).max(initial=1))


def test_kernel_path_selection(monkeypatch):
    from tinyvit158.errors import TinyViTError
    from tinyvit158.kernels import kernel_path

    monkeypatch.setenv("TINYVIT158_KERNEL", "generic")
    assert kernel_path() == "generic"
    monkeypatch.setenv("TINYVIT158_KERNEL", "auto")
    assert kernel_path() == ("vnni" if cpu_has_vnni() else "avx2" if cpu_has("avx2") else "generic")
    monkeypatch.setenv("TINYVIT158_KERNEL", "gpu")
    with pytest.raises(TinyViTError, match="use auto, generic, avx2, vnni"):
        kernel_path()
    for path in PATHS:  # a path the CPU lacks is refused by name; one it has is taken
        monkeypatch.setenv("TINYVIT158_KERNEL", path)
        if cpu_has(path):
            assert kernel_path() == path
        else:
            with pytest.raises(TinyViTError, match=f"lacks {PATH_FEATURES[path][0]}"):
                kernel_path()


def test_kernels_check_their_inputs():
    pw = prepared(np.zeros((3, 4), np.int8))
    with pytest.raises(TinyViTError, match="int8"):
        matmul(np.zeros((2, 4), np.float32), pw)
    with pytest.raises(TinyViTError, match="4"):
        matmul(np.zeros((2, 5), np.int8), pw)
    with pytest.raises(TinyViTError, match="float32 scales"):
        linear(np.zeros((2, 4), np.int8), np.zeros(3, np.float32), pw)
    with pytest.raises(TinyViTError, match="float32"):
        layernorm(np.zeros((2, 4)), np.ones(4), np.zeros(4), 1e-6)
    with pytest.raises(TinyViTError, match="shape"):
        layernorm(np.zeros((2, 4), np.float32), np.ones(3), np.zeros(4), 1e-6)
    with pytest.raises(TinyViTError, match="heads"):
        attention(np.zeros((1, 3, 10), np.float32), 2)


@given(seed=st.integers(0, 2**16), t=st.integers(1, 20), d=st.sampled_from([1, 2, 7, 64, 192, 385]))
def test_layernorm_quantize(seed, t, d):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, d)) * rng.uniform(0.01, 100)).astype(np.float32)
    g, b = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    y = layernorm(x, g, b, 1e-6)
    expected = oracle.layer_norm(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), 1e-6)
    np.testing.assert_allclose(y, expected, rtol=F32_RTOL, atol=F32_RTOL * np.abs(expected).max())
    # bit for bit the PyTorch twin's float64 formula, rounded once: the sums' order (8 lanes
    # when d is a multiple of 8, else one at a time) moves the float64 values by ~1e-16, which
    # changes a float32 rounding only within ~1e-8 of a tie (never seen in these sizes)
    xd = x.astype(np.float64)
    mean = xd.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((xd - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    assert np.array_equal(y, ((xd - mean) * rstd * g.astype(np.float64) + b.astype(np.float64)).astype(np.float32))
    q, s = layernorm_quantize(x, g, b, 1e-6)
    q2, s2 = quantize_activations(y)
    assert np.array_equal(q, q2) and np.array_equal(s, s2)  # fusion changes nothing


@given(seed=st.integers(0, 2**16), t=st.integers(1, 20), k=st.sampled_from([1, 3, 768]))
def test_gelu_quantize(seed, t, k):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, k)) * 3).astype(np.float32)
    y = gelu(x)
    expected = oracle.gelu(x.astype(np.float64))
    # the engine's erf is a rational approximation with |error| <= 6.5e-8, so GELU's error is
    # at most 0.5 |x| 6.5e-8 (plus float32 rounding): bound it by the inputs' scale
    np.testing.assert_allclose(y, expected, rtol=F32_RTOL, atol=F32_RTOL * np.abs(x).max())
    q, s = gelu_quantize(x)
    q2, s2 = quantize_activations(y)
    assert np.array_equal(q, q2) and np.array_equal(s, s2)


@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    n=st.integers(1, 70),
    heads=st.sampled_from([1, 3, 4]),
    hd=st.sampled_from([8, 16, 64]),  # 8: the float32 reference fallback; 16, 64: the float64 kernel
)
def test_attention_matches_reference_and_float64(seed, b, n, heads, hd):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, n, 3 * heads * hd)).astype(np.float32)
    fast = attention(qkv, heads)
    np.testing.assert_allclose(fast, attention_ref(qkv, heads), rtol=0, atol=ATTN_ATOL)
    q, k, v = qkv.astype(np.float64).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    exact = (oracle.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)) @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
    if hd % 16 or numba.config.DISABLE_JIT:
        np.testing.assert_allclose(fast, exact, rtol=0, atol=ATTN_ATOL)
    else:  # computed in float64, rounded once: within half a float32 ulp (plus float64 noise)
        np.testing.assert_allclose(fast, exact, rtol=2**-24, atol=1e-13)


@given(seed=st.integers(0, 2**16), t=st.integers(1, 9), k=st.integers(1, 50), n=st.integers(1, 20))
def test_float_linear(seed, t, k, n):
    from tinyvit158.kernels import float_linear

    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(t, k), (k, n), (n,)])
    exact = x.astype(np.float64) @ w.astype(np.float64) + b
    # a float32 sum of k + 1 terms errs by at most ~(k + 1) ulps of the sum of their magnitudes
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)) + np.abs(b)
    np.testing.assert_array_less(np.abs(float_linear(x, w, b) - exact), (k + 1) * 2**-23 * magnitude + 1e-30)


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="the zmm intrinsics need the JIT")
def test_softmax_numerators_in_zmm_equal_the_scalar_exp_bit_for_bit():
    from tinyvit158.kernels.attention import _exp64_inplace, _softmax_numerators

    rng = np.random.default_rng(5)
    for n in (1, 7, 8, 9, 16, 65, 200):
        row = rng.standard_normal(n) * 30
        pad = -n % 8  # the row's padding to a multiple of 8: scratch for the last vector
        sc = np.concatenate([np.full(3, 7.0), row, np.full(pad + 5, 7.0)])
        total = _softmax_numerators(sc, 3, n, 0.125)
        expected = (row - row.max()) * 0.125
        _exp64_inplace(expected, np.empty(n, np.int64), n)
        assert np.array_equal(sc[3 : 3 + n], expected), n  # 8 lanes at a time: the same bits
        assert np.all(sc[:3] == 7.0) and np.all(sc[3 + n + pad :] == 7.0)  # nothing past the padding
        assert abs(total - expected.sum()) <= 4e-16 * expected.sum()  # another order of the same sum


def test_vectorizable_float64_exp():
    from tinyvit158.kernels.attention import _exp64_inplace

    x = np.concatenate([-np.geomspace(1e-12, 700, 5000), [0.0, -0.5 * np.log(2), -708.0, -709.0, -1e4]])
    got = x.copy()
    _exp64_inplace(got, np.empty(len(x), np.int64), len(x))
    exact = np.exp(np.maximum(x, -708.0))
    assert np.max(np.abs(got - exact) / exact) < 5e-16  # about 2 float64 ulps
    assert np.all(got[x < -708] < 1e-307)
    y = x.copy()
    _exp64_inplace(y, np.empty(len(x), np.int64), 10)  # only the first n
    assert np.array_equal(y[:10], got[:10]) and np.array_equal(y[10:], x[10:])


def test_float32_exp_of_the_int8_attention():
    """The int8 attention's float32 exp (16 lanes, ``simd.fexp``) equals its NumPy
    twin bit for bit and is within 2 float32 ulps of exp; below -87 it stays finite."""
    import numba

    from tinyvit158.kernels.qattn import exp32
    from tinyvit158.kernels.simd import fexp, fload, fstore

    @numba.njit
    def run(x):
        for j in range(0, len(x), 16):
            fstore(x, j, fexp(fload(x, j)))

    x = np.concatenate([-np.geomspace(1e-7, 87, 4000), [0.0, -0.5 * np.log(2), -87.0, -88.0, -1e4, -np.inf]])
    x = np.concatenate([x, np.zeros(-len(x) % 16)]).astype(np.float32)
    got = x.copy()
    run(got)
    np.testing.assert_array_equal(got, exp32(x))
    exact = np.exp(np.maximum(x.astype(np.float64), -87.0))
    assert np.max(np.abs(got - exact) / exact) < 2 * 2.0**-23
    assert np.all(np.isfinite(got)) and np.all(got > 0)


def test_out_arguments_are_used_and_checked():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    q, s = np.zeros((5, 32), np.int8), np.zeros(5, np.float32)
    got = gelu_quantize(x, (q, s))
    assert got[0] is q and got[1] is s
    assert np.array_equal(q, gelu_quantize(x)[0]) and np.array_equal(s, gelu_quantize(x)[1])
    g, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    assert layernorm_quantize(x, g, b, 1e-6, (q, s))[0] is q
    assert np.array_equal(q, layernorm_quantize(x, g, b, 1e-6)[0])
    qkv = rng.standard_normal((2, 7, 96)).astype(np.float32)
    out = np.full((2, 7, 32), np.nan, np.float32)
    assert attention(qkv, 2, out) is out and np.array_equal(out, attention(qkv, 2))
    for bad in (np.zeros((5, 31), np.int8), np.zeros((5, 32), np.int16), np.zeros((32, 5), np.int8).T):
        with pytest.raises(TinyViTError, match="codes must be a C-contiguous int8 array"):
            gelu_quantize(x, (bad, s))
    with pytest.raises(TinyViTError, match="out must be"):
        attention(qkv, 2, np.zeros((2, 7, 33), np.float32))
    pw = PreparedTernary(rng.integers(-1, 2, (8, 32)).astype(np.int8), np.ones(8, np.float32))
    with pytest.raises(TinyViTError, match="residual or out"):
        linear(q, s, pw, residual=np.zeros((5, 8), np.float32), out=np.zeros((5, 8), np.float32))


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize(
    ("t", "k", "n"), [(300, 48, 96), (513, 100, 768), (1100, 192, 144), (65, 192, 768), (65, 768, 192), (700, 8, 50)]
)
def test_fused_linear_kernels_equal_their_steps(path, t, k, n, monkeypatch):
    """Fused (N % 48 == 0 on the VNNI path) or not, linear_gelu_quantize gives the codes
    and scales of its steps run one after the other, bit for bit, and linear's residual
    add is the float32 sum; tile edges in T and K included."""
    name, packed = kernel(path)
    monkeypatch.setenv("TINYVIT158_KERNEL", name)
    rng = np.random.default_rng(t + k + n)
    x_q, s_x, w = random_layer(rng, t, k, n, packed)
    q, s = linear_gelu_quantize(x_q, s_x, w)
    q_ref, s_ref = gelu_quantize(linear_ref(x_q, s_x, w))
    assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref)

    res = rng.standard_normal((t, n)).astype(np.float32)
    gamma, beta = rng.random(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    res_ref = res + linear_ref(x_q, s_x, w)
    q, s = layernorm_quantize(linear(x_q, s_x, w, residual=res), gamma, beta, 1e-6)
    q_ref, s_ref = layernorm_quantize(res_ref, gamma, beta, 1e-6)
    assert np.array_equal(res, res_ref) and np.array_equal(q, q_ref) and np.array_equal(s, s_ref)


@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    n=st.integers(1, 70),
    heads=st.sampled_from([1, 3, 4]),
    hd=st.sampled_from([8, 16, 64]),
)
def test_attention_quantize_equals_the_two_steps(seed, b, n, heads, hd):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, n, 3 * heads * hd)).astype(np.float32)
    q, s = attention_quantize(qkv, heads)
    q_ref, s_ref = quantize_rows(attention(qkv, heads).reshape(b * n, heads * hd))
    assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref)


@pytest.mark.skipif(not cpu_has_vnni(), reason="CPU lacks AVX-512 VNNI")
@pytest.mark.parametrize("parts", [1, 3, 5, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_work_split_does_not_change_results(parts, packed, monkeypatch):
    """Each kernel hands its jobs equal shares of the work (one job per thread by default);
    any number of jobs, more than there are tiles or rows included, gives the same bits."""
    from tinyvit158 import integer
    from tinyvit158.kernels import rowops, vnni

    # the module's names: the package's `attention` is the function
    from tinyvit158.kernels.attention import _NO_CODES, _NO_SCALES, _attention
    from tinyvit158.kernels.linear import bind_int_linear

    rng = np.random.default_rng(parts)
    t, k, n = 65, 192, 96  # 9 row tiles x 2 channel blocks; the last tile has one row
    x_q, s_x, w = random_layer(rng, t, k, n, packed)
    y = np.zeros((t, n), np.float32)
    vl = w.vnni
    flat = y.reshape(-1)
    vnni.linear_tiles(x_q.reshape(-1), vl.wl, k, t, n, packed, parts, True, s_x, w.scale, w.bias, True, flat, False,
                      vnni.NONE_I32)  # fmt: skip
    assert np.array_equal(y, linear_ref(x_q, s_x, w))
    acc = np.zeros((t, n), np.int32)
    e = vnni.NONE_F32
    vnni.linear_tiles(x_q.reshape(-1), vl.wl, k, t, n, packed, parts, False, e, e, e, False, e, False, acc)
    assert np.array_equal(acc, int64_reference(x_q, w.codes))

    h = rng.standard_normal((t, k)).astype(np.float32)
    q, s = np.zeros((t, k), np.int8), np.zeros(t, np.float32)
    rowops._gelu_quantize(h, q, s, parts)
    assert all(np.array_equal(a, b) for a, b in zip((q, s), gelu_quantize(h), strict=True))
    q, s = np.zeros((t, n), np.int8), np.zeros(t, np.float32)
    vnni.linear_rows(x_q.reshape(-1), vl.wl, k, t, n, packed, parts, s_x, w.scale, w.bias, True, q, s)
    assert all(np.array_equal(a, b) for a, b in zip((q, s), gelu_quantize(linear_ref(x_q, s_x, w)), strict=True))
    qkv = rng.standard_normal((2, t, 3 * 2 * 16)).astype(np.float32)
    o = np.zeros((2, t, 32), np.float32)
    _attention(qkv, 2, o.reshape(-1), parts, False, _NO_CODES, _NO_SCALES)
    assert np.array_equal(o, attention(qkv, 2))
    q, s = np.zeros((2 * t, 32), np.int8), np.zeros(2 * t, np.float32)
    _attention(qkv, 2, _NO_SCALES, parts, True, q, s)
    assert all(np.array_equal(a, b) for a, b in zip((q, s), quantize_rows(o.reshape(2 * t, 32)), strict=True))

    monkeypatch.setenv("TINYVIT158_KERNEL", "vnni")  # the one-pass integer layer (vnni.int_rows)
    R = rng.integers(0, integer.SAT + 1, t).astype(np.int64)
    g, e = integer.dyadic(rng.uniform(1e-3, 2.0, n))
    out, codes = np.zeros((t, n), np.int32), (np.zeros((t, n), np.int8), np.zeros(t, np.int64))
    fn, args = bind_int_linear(x_q, R, w, g, e, None, gelu=codes)
    assert fn is vnni.int_rows
    fn(*args[:6], parts, *args[7:])
    want = integer.linear(x_q, R, w.codes, g, e, None)
    assert all(np.array_equal(a, b) for a, b in zip(codes, integer.codes(integer.gelu(want)), strict=True))
    fn, args = bind_int_linear(x_q, R, w, g, e, None, out)
    fn(*args[:6], parts, *args[7:])
    assert np.array_equal(out, want)


@pytest.mark.parametrize("extra", [0, 1])
def test_generic_path_stays_exact_at_the_float32_bound(extra):
    """The generic tile sums in float32, exact while |sum| <= 127 K < 2**24; one input more
    than that bound and the int32 loops take over. All-127 inputs make the largest sums."""
    from tinyvit158.kernels.portable import K_EXACT

    k = K_EXACT + extra
    x = np.full((3, k), 127, dtype=np.int8)
    x[1] = -127
    w = PreparedTernary(np.ones((16, k), dtype=np.int8), np.ones(16, np.float32))
    assert np.array_equal(matmul(x, w, "generic"), int64_reference(x, w.codes))


@pytest.mark.skipif(not cpu_has("avx2"), reason="CPU lacks avx2 (or the JIT is off)")
@pytest.mark.parametrize("packed", [False, True])
def test_avx2_int16_sums_stay_exact_at_their_bound(packed):
    """The AVX2 kernel adds vpmaddubsw's pair sums (|u0 x0 + u1 x1| <= 2 * 2 * 128) in
    int16 lanes for CHUNK groups of 4 inputs, then widens: the largest sums any int8
    input makes (every weight +1, inputs all -128 or all 127) stay exact across K up to
    and past a chunk, where one more group per chunk than the bound allows would wrap."""
    from tinyvit158.kernels.avx2 import CHUNK

    assert CHUNK * 2 * 2 * 128 < 2**15
    for groups in (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5, 4 * CHUNK):
        k = 4 * groups
        x = np.full((5, k), -128, dtype=np.int8)
        x[1::2] = 127
        w = PreparedTernary(np.ones((48, k), dtype=np.int8), np.ones(48, np.float32), packed=packed)
        assert np.array_equal(matmul(x, w, "avx2"), int64_reference(x, w.codes)), groups
        w = PreparedTernary(-np.ones((48, k), dtype=np.int8), np.ones(48, np.float32), packed=packed)
        assert np.array_equal(matmul(x, w, "avx2"), int64_reference(x, w.codes)), groups
