"""Integer numerics (``integer.py``): each rule against exact rational arithmetic, each stated
int64 bound at its limit against Python's unbounded integers, and the model's invariants."""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyvit158 import constants as C
from tinyvit158 import integer as I
from tinyvit158.config import get_preset
from tinyvit158.errors import ConfigError
from tinyvit158.weights import load_weights, random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
INT53 = st.integers(-(2**53), 2**53)


def half_up(fr: Fraction) -> int:
    return math.floor(fr + Fraction(1, 2))


@given(INT53, st.integers(1, 2**40))
def test_round_div_is_a_over_b_rounded_half_up(a, b):
    assert int(I.round_div(a, b)) == half_up(Fraction(a, b))


@given(st.lists(st.integers(-(2**49), 2**49), min_size=1, max_size=40), st.sampled_from([127, 7, 3]))
def test_codes_round_half_away_from_zero_and_are_symmetric(row, qmax):
    v = np.array(row, np.int64)
    q, m = I.codes(v, qmax)
    mm = max(abs(x) for x in row)
    assert int(m) == mm
    for x, c in zip(row, q, strict=True):
        want = 0 if mm == 0 else (1 if x > 0 else -1) * half_up(Fraction(qmax * abs(x), mm))
        assert int(c) == want
    assert np.array_equal(I.codes(-v, qmax)[0], -q)
    assert mm == 0 or int(np.abs(q).max()) == qmax


@given(st.integers(0, 2**53 - 1))
def test_isqrt_is_the_floor_of_the_square_root(v):
    assert int(I.isqrt(np.array([v]))[0]) == math.isqrt(v)


@given(st.floats(1e-12, 2.0**15, allow_nan=False, exclude_max=True))
def test_dyadic_scales_have_a_16_bit_mantissa(c):
    g, e = I.dyadic(np.array([c]))
    assert 2**15 <= g[0] <= 2**16 and e[0] >= 1
    assert abs(Fraction(int(g[0])) / 2 ** int(e[0]) - Fraction(c)) <= Fraction(c) / 2**16


def test_gelu_and_exp_follow_their_float_models():
    x = np.linspace(-8, 8, 4001)
    h = I.to_q16(x)
    gelu = I.gelu(h) / I.ONE
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    assert np.abs(gelu - exact).max() < 0.02  # i-GELU's own error (I-BERT: a second-order erf)
    z = np.linspace(-20, 0, 4001)
    e = I.exp_neg(I.to_q16(z)) / I.ONE
    assert np.all(np.abs(e - np.exp(z)) <= 0.004 * np.exp(z) + 2**-16)
    assert np.all(np.diff(e) >= 0)  # monotone


def test_the_bounds_hold_at_their_limits():
    """Each int64 product at the stated extremes equals Python's unbounded integer result."""
    big = np.int64(I.SAT)
    # linear: |acc| <= qmax K (K = 2**15), R <= 2**24, g <= 2**16, e small
    K = 2**15
    acc_max = 127 * K
    y = I.round_div(np.int64(acc_max) * big * np.int64(2**16), np.int64(127))
    assert int(y) == half_up(Fraction(acc_max * int(big) * 2**16, 127))
    # LayerNorm: |d| <= 2**25 over D = 2**12: the sum of squares
    d = np.full(2**12, 2**25, np.int64)
    assert int((d * d).sum()) == 2**12 * 2**50
    # codes of T: 2 qmax |T| for |T| < 2**49
    q, _ = I.codes(np.array([2**49 - 1, -(2**48)], np.int64))
    assert q.tolist() == [127, -half_up(Fraction(127 * 2**48, 2**49 - 1))]
    # GELU at |h| = 2**25 and exp at its largest polynomial
    assert int(I.gelu(np.array([2**25]))[0]) == 2**25 * (2 * I.ONE) // (2 * I.ONE)
    assert 0 < int(I.exp_neg(np.array([0]))[0]) <= 2 * I.ONE


def test_the_format_doc_states_the_module_constants():
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    sec = text[text.index("### 7.5") :]
    for value in (I.LN2, C.EXP_A, C.EXP_B, C.EXP_C, C.INV_SQRT2, -C.GELU_B, C.GELU_A):
        assert re.search(rf"(?<![\d-]){value}(?!\d)", sec), value


@pytest.fixture(scope="module")
def int_ckpt():
    ck = load_weights(ROOT / "weights" / "cifar10-tiny.safetensors")
    from tinyvit158.weights import Checkpoint

    return Checkpoint(ck.config.replace(numerics="integer", attention="int8"), ck.tensors, ck.source)


@pytest.fixture(scope="module")
def images():
    from tinyvit158.image import load_image

    cfg = get_preset("cifar10-tiny")
    return np.stack([load_image(p, cfg) for p in sorted((ROOT / "examples").glob("*.jpg"))])


def test_the_integer_model_computes_each_image_alone(int_ckpt, images):
    """Batch composition changes nothing: one image at a time gives the batch's integers."""
    model = I.IntegerOracle(int_ckpt)
    together = model.integers(images)
    alone = np.concatenate([model.integers(images[i : i + 1]) for i in range(len(images))])
    assert together.dtype == np.int64 and np.array_equal(together, alone)


def test_the_integer_model_stays_close_to_the_float_one(int_ckpt, images):
    """Post-training, on the ten examples: the same classes, logits within a few tenths."""
    from tinyvit158.engine import Engine

    ck = load_weights(ROOT / "weights" / "cifar10-tiny.safetensors")
    floats = Engine(ck)(images)
    ints = I.IntegerOracle(int_ckpt)(images)
    assert np.array_equal(floats.argmax(1), ints.argmax(1))
    assert np.abs(floats - ints).max() < 0.5


def test_every_stage_is_an_integer_within_its_bound(int_ckpt, images):
    model = I.IntegerOracle(int_ckpt)
    model.trace = {}
    model.integers(images[:2])
    for stage, v in model.trace.items():
        assert v.dtype == np.int64, stage
        limit = (1 << 16) if stage.endswith(".attn.p") else I.SAT
        assert np.abs(v).max() <= limit, stage


def test_integer_numerics_needs_integer_attention(int_ckpt):
    cfg = get_preset("cifar10-tiny")
    with pytest.raises(ConfigError, match="needs attention='int8'"):
        cfg.replace(numerics="integer")
    with pytest.raises(ConfigError, match="numerics"):
        cfg.replace(numerics="fixed")
    assert "numerics" not in cfg.to_json()  # float files stay byte for byte what they were
    assert '"numerics": "integer"' in int_ckpt.config.to_json()
    from tinyvit158.engine import Engine
    from tinyvit158.pipeline import engine_name, make_model

    assert isinstance(make_model(int_ckpt, "oracle"), I.IntegerOracle)
    assert isinstance(make_model(int_ckpt, "fast"), Engine)  # tests/test_integer_engine.py: the same integers
    assert engine_name(int_ckpt.config, "oracle") == "integer reference"
    assert engine_name(int_ckpt.config, "fast") == "fast"


def test_a_float_head_becomes_int8_codes_per_channel():
    ck = random_checkpoint(get_preset("cifar10-tiny").replace(depth=1, numerics="integer", attention="int8"))
    w, g, e, B = I.IntegerParams(ck).linear["head"]
    assert np.abs(w).max() == 127 and np.all(np.abs(w).max(axis=1) == 127)
    peak = np.abs(ck.float_weight("head")).max(axis=1).astype(np.float64)
    assert np.allclose(g / 2.0**e, peak / 127, rtol=2**-15)


def test_the_pytorch_twin_computes_the_same_integers(int_ckpt, images):
    """With and without gradients, on the shipped weights and on a random 4-bit-attention model."""
    torch = pytest.importorskip("torch", reason="the train extra is not installed")
    from tinyvit158.train.model import QATViT
    from tinyvit158.weights import Checkpoint

    rnd = random_checkpoint(get_preset("cifar10-tiny").replace(depth=2, numerics="integer", attention="int8",
                                                               attention_bits=4, attention_prob_bits=4,
                                                               attention_prob_clip=0.25), seed=5)  # fmt: skip
    for ck in (int_ckpt, rnd):
        want = I.IntegerOracle(ck).integers(images)
        twin = QATViT.from_checkpoint(ck)
        with torch.no_grad():
            logits, ints = twin.integer_forward(torch.from_numpy(images))
        assert ints.dtype == torch.int64 and np.array_equal(ints.numpy(), want)
        assert np.array_equal(logits.numpy(), (want / I.ONE).astype(np.float32))
    twin = QATViT.from_checkpoint(Checkpoint(int_ckpt.config, int_ckpt.tensors))
    twin.train()
    logits, ints = twin.integer_forward(torch.from_numpy(images[:3]))
    assert np.array_equal(ints.numpy(), I.IntegerOracle(int_ckpt).integers(images[:3]))
    logits.logsumexp(1).sum().backward()  # the straight-through gradients reach the parameters
    assert twin.blocks[0].mlp.fc1.weight.grad is not None and twin.norm.weight.grad.abs().sum() > 0


DATA = os.environ.get("TINYVIT158_DATA")


@pytest.mark.skipif(not DATA, reason="TINYVIT158_DATA is not set (CI sets it)")
def test_the_shipped_integer_file_and_its_twin_agree_on_real_test_images():
    """Every 157th of the 10,000 test images (64), through the reference and the PyTorch twin:
    array_equal, no tolerance."""
    torch = pytest.importorskip("torch", reason="the train extra is not installed")
    from tinyvit158.data import load_cifar10
    from tinyvit158.image import normalize
    from tinyvit158.train.model import QATViT

    ck = load_weights(ROOT / "weights" / "cifar10-tiny-int.safetensors")
    assert ck.config.numerics == "integer" and ck.config.attention == "int8"
    test = load_cifar10(DATA, "test")
    idx = np.arange(0, 10_000, 157)
    x = np.stack([normalize(im, ck.config) for im in test.images[idx]])
    want = I.IntegerOracle(ck).integers(x)
    with torch.no_grad():
        _, ints = QATViT.from_checkpoint(ck).integer_forward(torch.from_numpy(x))
    assert np.array_equal(ints.numpy(), want)
    assert (want.argmax(1) == test.labels[idx]).mean() > 0.8
