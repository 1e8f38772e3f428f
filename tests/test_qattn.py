"""Fully quantized attention (``kernels/qattn.py``): the integer accumulators of Q K^T and
P V equal int64 references exactly, for any shape, on every kernel path; the fused kernel
equals its NumPy reference twin, and the VNNI and generic paths equal each other bit for bit."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kernel_paths import KERNEL_PATHS
from kernel_paths import kernel as kernel_of

from tinyvit158 import TinyViTError, get_preset
from tinyvit158.kernels import Int8Attention, attention_op, cpu_has
from tinyvit158.kernels.qattn import pv_accumulate, pv_accumulate_ref, qk_accumulate, qk_accumulate_ref
from tinyvit158.weights import random_checkpoint

PATHS = sorted({kernel_of(p.values[0])[0] for p in KERNEL_PATHS})
TOKENS = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 15, 16, 17, 65, 197]), st.integers(1, 257))
PATTERNS = ("random", "extreme", "all_equal", "one_hot", "uniform", "zero")


def codes(rng, shape, pattern, qmax=127):
    x = rng.integers(-qmax, qmax + 1, size=shape).astype(np.int8)
    if pattern == "extreme":
        x[:] = np.where(rng.random(shape) < 0.5, qmax, -qmax)
    elif pattern == "all_equal":  # every key alike: all scores of a row equal
        x[:] = x[:1]
    elif pattern == "zero":
        x[:] = 0
    return x


def probs(rng, shape, pattern, levels=255):
    p = rng.integers(0, levels + 1, size=shape).astype(np.uint8)
    if pattern == "one_hot":
        p[:] = 0
        p[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = levels
    elif pattern == "uniform":
        p[:] = np.rint(levels / shape[1])
    elif pattern == "extreme":
        p[:] = levels
    elif pattern == "zero":
        p[:] = 0
    return p


ON_EVERY_PATH = pytest.mark.parametrize(
    "path", [pytest.param(p, marks=m.marks) for p in PATHS for m in KERNEL_PATHS if m.values[0] == p]
)


@ON_EVERY_PATH
@given(nq=TOKENS, nk=TOKENS, hd=st.integers(1, 128), pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**16))
def test_qk_accumulators_are_exact(path, nq, nk, hd, pattern, seed):
    rng = np.random.default_rng(seed)
    q, k = codes(rng, (nq, hd), pattern), codes(rng, (nk, hd), pattern)
    got = qk_accumulate(q, k, path)
    assert got.dtype == np.int32 and np.array_equal(got, qk_accumulate_ref(q, k))


@ON_EVERY_PATH
@given(nq=TOKENS, nk=TOKENS, hd=st.integers(1, 128), pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**16))
def test_pv_accumulators_are_exact(path, nq, nk, hd, pattern, seed):
    rng = np.random.default_rng(seed)
    p, v = probs(rng, (nq, nk), pattern), codes(rng, (nk, hd), "extreme" if pattern == "extreme" else "random")
    got = pv_accumulate(p, v, path)
    assert got.dtype == np.int32 and np.array_equal(got, pv_accumulate_ref(p, v))


def test_accumulators_check_their_input():
    with pytest.raises(TinyViTError, match="int8"):
        qk_accumulate(np.zeros((2, 3), np.int16), np.zeros((2, 3), np.int8))
    with pytest.raises(TinyViTError, match="uint8"):
        pv_accumulate(np.zeros((2, 3), np.int8), np.zeros((3, 4), np.int8))


def _op(heads, hd, bits, prob_bits, qk_norm, rng, clip=1.0):
    if not qk_norm:
        return Int8Attention(heads, bits, prob_bits, prob_clip=clip)
    norm = [(1 + 0.2 * rng.standard_normal(hd).astype(np.float32), 0.1 * rng.standard_normal(hd).astype(np.float32),
             1e-6) for _ in "qk"]  # fmt: skip
    return Int8Attention(heads, bits, prob_bits, *norm, prob_clip=clip)


@pytest.mark.parametrize(
    "bits, prob_bits, clip",
    [(8, 8, 1.0), (4, 4, 1.0), (4, 8, 1.0), (8, 4, 1.0), (6, 6, 1.0), (4, 4, 0.25), (8, 8, 2**-7)],
)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("B, N, heads, hd", [(2, 65, 3, 64), (1, 197, 2, 40), (3, 5, 1, 3)])
def test_fused_kernel_equals_its_reference_on_every_path(bits, prob_bits, clip, qk_norm, B, N, heads, hd, monkeypatch):
    """Codes (q, k, v, p) and outputs as the NumPy twin computes them; the two kernel paths
    give the same bits. (np.exp and the kernel's exp differ in the last float64 bits, so
    a probability code could flip at a float64-level tie: none on these inputs.)"""
    rng = np.random.default_rng(B * N + hd)
    qkv = (rng.standard_normal((B, N, 3 * heads * hd)) * rng.uniform(0.5, 3)).astype(np.float32)
    op = _op(heads, hd, bits, prob_bits, qk_norm, rng, clip)
    want = {}
    expected = op.reference(qkv, want)
    outs = {}
    for path in [p for p in PATHS if cpu_has(p)]:
        monkeypatch.setenv("TINYVIT158_KERNEL", path)
        got = {}
        outs[path] = op(qkv, heads, record=got)
        for site in "qkvp":
            assert np.array_equal(got[site], want[site]), (path, site)
        codes_, scales = op.quantize(qkv, heads)
        from tinyvit158.quant import quantize_activations

        ref_codes, ref_scales = quantize_activations(outs[path].reshape(B * N, -1))
        assert np.array_equal(codes_, ref_codes) and np.array_equal(scales, ref_scales)
    np.testing.assert_array_equal(outs["generic"], expected)
    for out in outs.values():
        np.testing.assert_array_equal(out, outs["generic"])


def test_uniform_and_one_hot_attention():
    """All-equal scores give p = 1/N for every key; one dominant key gives a one-hot row:
    P V then returns v's codes times their scales (the quantized v) exactly."""
    heads, hd, N = 1, 16, 8
    qkv = np.zeros((1, N, 3 * hd), np.float32)
    rng = np.random.default_rng(0)
    qkv[0, :, 2 * hd :] = rng.standard_normal((N, hd))
    op = Int8Attention(heads, 8, 8)
    rec = {}
    out = op(qkv, heads, record=rec)  # q = k = 0: every score 0, p = 1/8 -> rint(255 / 8) = 32
    assert np.all(rec["p"] == 32)
    qkv[0, :, :hd] = 10.0
    qkv[0, 3, hd : 2 * hd] = 10.0  # key 3 alone scores high
    rec = {}
    out = op(qkv, heads, record=rec)
    assert np.all(rec["p"][0, 0, :, 3] == 255) and rec["p"].sum() == 255 * N
    v_c, s_v = rec["v"][0, 0], np.abs(qkv[0, :, 2 * hd :]).max(0) / 127  # (hd, N), (hd,)
    np.testing.assert_allclose(out[0], np.broadcast_to(v_c[:, 3] * s_v, (N, hd)), rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_probability_clip_saturates_and_rescales(path, monkeypatch):
    """attention_prob_clip c: codes min(rint(p * L / c), L), dequantized by c / L. Uniform
    scores over 8 keys with c = 1/4: p = 1/8 -> rint(15 * 4 / 8) = rint(7.5) = 8 (half to
    even), and P V is the mean of v's codes times 8 / 60; a dominant key saturates at L = 15
    and P V returns v's quantized row times 15 / 60 = c."""
    if not cpu_has(path):
        pytest.skip(f"this CPU lacks the {path} path's instructions")
    monkeypatch.setenv("TINYVIT158_KERNEL", path)
    heads, hd, N = 1, 16, 8
    qkv = np.zeros((1, N, 3 * hd), np.float32)
    qkv[0, :, 2 * hd :] = np.random.default_rng(1).standard_normal((N, hd))
    op = Int8Attention(heads, 8, 4, prob_clip=0.25)
    rec = {}
    out = op(qkv, heads, record=rec)
    v_c, s_v = rec["v"][0, 0].astype(np.float64), np.abs(qkv[0, :, 2 * hd :]).max(0) / 127  # (hd, N), (hd,)
    assert np.all(rec["p"] == 8)
    np.testing.assert_allclose(out[0], np.broadcast_to(v_c.sum(1) * 8 * s_v / 60, (N, hd)), rtol=1e-6)
    qkv[0, :, :hd] = 10.0
    qkv[0, 3, hd : 2 * hd] = 10.0
    rec = {}
    out = op(qkv, heads, record=rec)
    assert np.all(rec["p"][0, 0, :, 3] == 15) and rec["p"].sum() == 15 * N
    np.testing.assert_allclose(out[0], np.broadcast_to(v_c[:, 3] * s_v * 0.25, (N, hd)), rtol=1e-6)
    assert np.array_equal(out, op.reference(qkv))


def test_attention_op_follows_the_config():
    cfg = get_preset("cifar10-tiny").replace(
        depth=1, attention="int8", attention_bits=4, qk_norm=True, attention_prob_clip=0.5
    )
    ckpt = random_checkpoint(cfg, seed=1)
    op = attention_op(cfg, ckpt.tensors, 0)
    assert isinstance(op, Int8Attention) and (op.bits, op.prob_bits, op.prob_clip) == (4, 8, 0.5)
    assert np.array_equal(op.q_norm[0], ckpt.tensors["blocks.0.attn.q_norm.weight"])
    assert not isinstance(attention_op(get_preset("cifar10-tiny"), {}, 0), Int8Attention)


@pytest.mark.parametrize("bits, prob_bits, qk_norm, clip", [(8, 8, False, 1.0), (4, 4, True, 1.0), (4, 4, False, 0.25)])
def test_pytorch_twin_computes_the_same_bits(bits, prob_bits, qk_norm, clip):
    """``train/model.int8_attention`` (inference) equals the NumPy reference bit for bit on
    ~1 M q/k/v values: every float32 operation in the same order (a scalar / tensor
    division in PyTorch is a reciprocal and a product, which once flipped a code here)."""
    torch = pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")
    from tinyvit158.train.model import LayerNorm, int8_attention

    B, N, H, hd = 4, 65, 3, 64
    for seed in range(20):
        rng = np.random.default_rng(seed)
        qkv = (rng.standard_normal((B, N, 3 * H * hd)) * rng.uniform(0.3, 3)).astype(np.float32)
        op = _op(H, hd, bits, prob_bits, qk_norm, rng, clip)
        q, k, v = torch.from_numpy(qkv).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        with torch.no_grad():
            if qk_norm:
                norms = []
                for w, b, eps in (op.q_norm, op.k_norm):
                    ln = LayerNorm(hd, eps=eps)
                    ln.weight.copy_(torch.from_numpy(w))
                    ln.bias.copy_(torch.from_numpy(b))
                    norms.append(ln)
                q, k = norms[0](q), norms[1](k)
            got = int8_attention(q, k, v, 2 ** (bits - 1) - 1, 2**prob_bits - 1, clip=clip)
        got = got.transpose(1, 2).reshape(B, N, H * hd).numpy()
        np.testing.assert_array_equal(got, op.reference(qkv), err_msg=f"seed {seed}")
