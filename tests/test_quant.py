import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst
from strategies import float_TK

from tinyvit158.errors import TinyViTError
from tinyvit158.kernels import quantize_rows
from tinyvit158.quant import ACT_EPS, quantize_activations, ternarize


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data())
def test_activation_quantizer_properties(dtype, data):
    x = data.draw(float_TK(dtype))
    x_q, s = quantize_activations(x)
    assert x_q.dtype == np.int8 and s.dtype == dtype and s.shape == x.shape[:1]
    assert np.all(np.abs(x_q.astype(int)) <= 127)
    nonzero = np.max(np.abs(x), axis=1) > ACT_EPS
    assert np.all(np.max(np.abs(x_q[nonzero].astype(int)), axis=1) == 127)  # the absmax maps to +-127
    # dequantization error is at most half a step; the slack covers the rounding of x / s and x_q * s
    slack = 4 * np.finfo(dtype).eps * np.abs(x)
    assert np.all(np.abs(x - x_q * s[:, None]) <= s[:, None] / 2 + slack)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_round_half_to_even(dtype):
    # absmax 127 makes s = 1 exactly, so x / s lands exactly on the ties below
    x = np.array([[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5]], dtype=dtype)
    x_q, s = quantize_activations(x)
    assert s[0] == 1.0
    assert x_q.tolist() == [[127, 2, 4, -2, -4, 0, 0, 2, 126]]
    if dtype == np.float32:  # the engine's fused quantizer breaks ties the same way
        q2, s2 = quantize_rows(x)
        assert np.array_equal(q2, x_q) and np.array_equal(s2, s)


def test_zero_row_gets_finite_scale():
    x_q, s = quantize_activations(np.zeros((2, 5), np.float32))
    assert np.all(x_q == 0) and np.all(s == np.float32(ACT_EPS) / np.float32(127))


@given(x=float_TK(np.float32, max_t=8, max_k=64))
def test_engine_quantizer_is_bit_identical(x):
    q1, s1 = quantize_activations(x)
    q2, s2 = quantize_rows(x)
    assert np.array_equal(q1, q2) and np.array_equal(s1, s2)


def test_quantizer_rejects_integers():
    with pytest.raises(TinyViTError, match="float32 or float64"):
        quantize_activations(np.zeros((2, 2), np.int32))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@given(
    w=npst.arrays(
        np.float32,
        npst.array_shapes(min_dims=2, max_dims=2, max_side=20),
        elements=st.floats(-10, 10, width=32),
    )
)
def test_ternarize_absmean(granularity, w):
    codes, scale = ternarize(w, granularity)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (w.shape[0],)
    assert set(np.unique(codes)) <= {-1, 0, 1}
    w64 = w.astype(np.float64)
    gamma = np.mean(np.abs(w64)) if granularity == "tensor" else np.mean(np.abs(w64), axis=1)
    assert np.array_equal(scale, np.broadcast_to(gamma, scale.shape).astype(np.float32))
    g = np.broadcast_to(np.asarray(gamma).reshape(-1, 1), w.shape) + 1e-5
    expected = np.clip(np.rint(w64 / g), -1, 1)
    assert np.array_equal(codes, expected)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.01, 100))
def test_ternarize_is_idempotent_on_ternary_matrices(granularity, seed, alpha):
    # gamma of alpha * T is alpha * (fraction of non-zeros) <= alpha, so T / fraction rounds back to T
    t = np.random.default_rng(seed).integers(-1, 2, size=(6, 17)).astype(np.int8)
    codes, _ = ternarize(alpha * t.astype(np.float64), granularity)
    assert np.array_equal(codes, t)


def test_ternarize_rejects_bad_input():
    with pytest.raises(TinyViTError, match="2-D"):
        ternarize(np.zeros(4))
    with pytest.raises(TinyViTError, match="non-finite"):
        ternarize(np.array([[np.nan, 1.0]]))
    with pytest.raises(TinyViTError, match="granularity"):
        ternarize(np.zeros((2, 2)), "row")
