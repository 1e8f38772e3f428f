import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import ternary_NK_strategy

from tinyvit158.errors import PackingError, TinyViTError
from tinyvit158.packing import FORMATS, bits_per_weight, pack, packed_cols, unpack

FMTS = sorted(FORMATS)


@pytest.mark.parametrize("fmt", FMTS)
@given(w=ternary_NK_strategy())
def test_round_trip_and_size(fmt, w):
    packed = pack(w, fmt)
    n, k = w.shape
    assert packed.dtype == np.uint8
    assert packed.shape == (n, -(-k // FORMATS[fmt]))  # ceil(K/4) or ceil(K/5) bytes per row
    assert np.array_equal(unpack(packed, k, fmt), w)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 9, 10, 11, 191, 192, 768, 1001])
def test_every_small_and_odd_k(fmt, k):
    w = np.random.default_rng(k).integers(-1, 2, size=(3, k)).astype(np.int8)
    assert packed_cols(k, fmt) == -(-k // FORMATS[fmt])
    assert np.array_equal(unpack(pack(w, fmt), k, fmt), w)


def test_rows_are_packed_independently():
    w = np.array([[1, -1, 0, 1, 1], [0, 0, 0, 0, -1]], dtype=np.int8)
    for fmt in FMTS:
        both = pack(w, fmt)
        for r in range(2):
            assert np.array_equal(both[r : r + 1], pack(w[r : r + 1], fmt))


def test_ternary2_bit_layout():
    # weights 0, +1, -1, +1 -> codes 0, 1, 2, 1 at bits 0-1, 2-3, 4-5, 6-7
    w = np.array([[0, 1, -1, 1]], dtype=np.int8)
    assert pack(w, "ternary2")[0, 0] == 0 | 1 << 2 | 2 << 4 | 1 << 6
    assert pack(np.zeros((1, 4), np.int8), "ternary2")[0, 0] == 0


def test_ternary3_base3_layout():
    # trits t = w + 1 = 0, 1, 2, 2, 1 -> 0 + 1*3 + 2*9 + 2*27 + 1*81
    w = np.array([[-1, 0, 1, 1, 0]], dtype=np.int8)
    assert pack(w, "ternary3")[0, 0] == 3 + 18 + 54 + 81
    assert pack(np.ones((1, 5), np.int8), "ternary3")[0, 0] == 242  # the largest valid byte


def test_bits_per_weight():
    assert bits_per_weight("ternary2") == 2.0
    assert bits_per_weight("ternary3") == 1.6
    assert bits_per_weight("ternary3") / np.log2(3) == pytest.approx(1.0094, abs=1e-4)  # 99.1% efficient


@given(k=st.integers(1, 64), row=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_ternary2_rejects_code_3(k, row, seed):
    rng = np.random.default_rng(seed)
    packed = pack(rng.integers(-1, 2, size=(3, k)).astype(np.int8), "ternary2")
    byte = rng.integers(packed.shape[1])
    slot = rng.integers(min(4, k - 4 * byte))  # a slot holding a real weight
    packed[row, byte] |= np.uint8(3 << (2 * slot))
    with pytest.raises(PackingError, match=f"row {row}, byte {byte}"):
        unpack(packed, k, "ternary2")


@given(k=st.integers(1, 64), bad=st.integers(243, 255), seed=st.integers(0, 2**16))
def test_ternary3_rejects_bytes_above_242(k, bad, seed):
    rng = np.random.default_rng(seed)
    packed = pack(rng.integers(-1, 2, size=(2, k)).astype(np.int8), "ternary3")
    packed[1, rng.integers(packed.shape[1])] = bad
    with pytest.raises(PackingError, match="row 1"):
        unpack(packed, k, "ternary3")


@pytest.mark.parametrize("fmt,k", [("ternary2", 5), ("ternary2", 7), ("ternary3", 6), ("ternary3", 9)])
def test_nonzero_padding_is_rejected(fmt, k):
    w = np.zeros((1, -(-k // FORMATS[fmt]) * FORMATS[fmt]), np.int8)
    w[0, -1] = 1  # a weight in the padding
    with pytest.raises(PackingError, match="padding"):
        unpack(pack(w, fmt), k, fmt)


@pytest.mark.parametrize("fmt", FMTS)
def test_bad_inputs(fmt):
    with pytest.raises(PackingError, match="shape"):
        unpack(np.zeros((2, 3), np.uint8), 100, fmt)
    with pytest.raises(PackingError, match="uint8"):
        unpack(np.zeros((2, 3), np.int8), 10, fmt)
    with pytest.raises(PackingError, match="-1, 0, \\+1"):
        pack(np.full((1, 4), 2, np.int8), fmt)
    with pytest.raises(PackingError, match="integer"):
        pack(np.zeros((1, 4), np.float32), fmt)
    with pytest.raises(TinyViTError, match="unknown packing"):
        pack(np.zeros((1, 4), np.int8), "ternary9")
