"""Integer numerics in the fast engine (``engine.NUMERICS["integer"]``, ``kernels/intops.py``):
each kernel against its int64 reference in ``integer.py``, and the engine's Q16 logits
``array_equal`` to ``integer.IntegerOracle``'s on every kernel path, at 1 and 2 threads and
at several batch sizes; on the shipped file, equal to the golden vectors."""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest
import safetensors.numpy
from kernel_paths import KERNEL_PATHS, kernel

from tinyvit158 import integer as I
from tinyvit158.config import get_preset
from tinyvit158.engine import Engine
from tinyvit158.errors import TinyViTError
from tinyvit158.kernels import PreparedTernary, bind_int_linear, intops, matmul
from tinyvit158.kernels.linear import INT_ROWS
from tinyvit158.weights import load_weights, random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BASE = get_preset("cifar10-tiny").replace(numerics="integer", attention="int8")
CONFIGS = {
    "cifar10-tiny-depth2": BASE.replace(depth=2),
    "attn4-clip-float-patch-ternary-head": BASE.replace(
        depth=1, attention_bits=4, attention_prob_bits=4, attention_prob_clip=0.25, ternary_patch_embed=False,
        ternary_head=True, qkv_bias=False,
    ),
    "deit-tiny-shapes-depth1": get_preset("deit-tiny").replace(depth=1, numerics="integer", attention="int8"),
}  # fmt: skip


def images(cfg, b, seed):
    x = np.random.default_rng(seed).standard_normal((b, cfg.in_chans, cfg.image_size, cfg.image_size))
    return (x * 1.5).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_row_kernels_equal_their_references(seed):
    rng = np.random.default_rng(seed)
    T, D = 37, 96
    z = rng.integers(-I.SAT, I.SAT + 1, (T, D)).astype(np.int64)
    z[0] = I.SAT  # a constant row: zero variance, codes all zero
    z[1, ::2], z[1, 1::2] = -I.SAT, I.SAT  # the extremes
    G, B = (I.to_q16(rng.standard_normal(D) * 3) for _ in range(2))
    E = int(np.rint(np.ldexp(1e-6, 32)))
    out = np.zeros((T, D), np.int8), np.zeros(T, np.int64)
    q, R = intops.layernorm_codes(z, G, B, E, 127, out)
    q_ref, R_ref = I.layer_norm_codes(z, G, B, E)
    assert np.array_equal(q, q_ref) and np.array_equal(R, R_ref)

    h = rng.integers(-(2**25), 2**25 + 1, (T, D)).astype(np.int64)
    q, R = intops.gelu_codes(h, 127, out)
    q_ref, R_ref = I.codes(I.gelu(h))
    assert np.array_equal(q, q_ref) and np.array_equal(R, R_ref)
    for qmax in (127, 7):
        q, R = intops.codes_rows(h, qmax, out)
        q_ref, R_ref = I.codes(h, qmax)
        assert np.array_equal(q, q_ref) and np.array_equal(R, R_ref)

    codes = rng.integers(-1, 2, (48, D)).astype(np.int8)
    xq = rng.integers(-127, 128, (T, D)).astype(np.int8)
    R = rng.integers(0, I.SAT + 1, T).astype(np.int64)
    g, e = I.dyadic(rng.uniform(1e-4, 2.0, 48))
    bias = I.to_q16(rng.standard_normal(48))
    y = np.zeros((T, 48), np.int64)
    acc = matmul(xq, PreparedTernary(codes, np.ones(48, np.float32)))
    for b in (bias, None):
        intops.requantize(acc, R, g, e, b, y)
        assert np.array_equal(y, I.linear(xq, R, codes, g, e, b))
    x = rng.integers(-I.SAT, I.SAT + 1, (T, 48)).astype(np.int32)  # a residual stream, clamped after the sum
    want = np.clip(x + I.linear(xq, R, codes, g, e, bias), -I.SAT, I.SAT)
    intops.requantize(acc, R, g, e, bias, y, residual=x)
    assert np.array_equal(x, want) and np.array_equal(y, I.linear(xq, R, codes, g, e, bias))


def test_requantize_is_exact_at_ties_beside_them_and_past_the_estimates_bound():
    """The float64 estimate is used only away from ties and below 2**30: exact ties
    (R = 127, g = 2**15, e = 16: v = acc / 2), values 2**-16 acc beside them (g = 2**15 + 1),
    2**-22 acc beside them, ties the estimate misses, values past the bound, random rows."""
    rng = np.random.default_rng(5)
    acc = np.arange(-4000, 4001, dtype=np.int32)[None].repeat(4, axis=0)
    cases = []
    for g0, e0 in ((2**15, 16), (2**15 + 1, 16), (2**15 * 64 + 1, 22), (2**16, 1)):
        R = np.array([127, 127 * 3, 127 * 2**10, I.SAT], np.int64)
        cases.append((acc, R, np.full(acc.shape[1], g0, np.int64), np.full(acc.shape[1], e0, np.int64)))
    # exact ties whose estimate falls just below k + 1/2 (found by a seeded search): only the
    # margin sends them to the int64 path
    for a0, R0, g0, e0 in ((69, 16646144, 53387, 18), (21121, 16646144, 48275, 18), (46883, 8323072, 36527, 17)):
        cases.append((np.array([[a0, -a0]], np.int32), np.array([R0]), np.array([g0, g0]), np.array([e0, e0])))
    # such ties past 2**30, and a value past 2**47 the estimate misses away from any tie, each
    # brought back into range by a bias
    big = []
    for a0, R0, g0, e0, v0 in (
        (71485, 8323072, 40687, 17, 1454255097),
        (87727, 8323072, 45193, 17, 1982323155),
        (62659, 15342235, 36713, 1, 138949902966467),
    ):
        big.append((np.array([[a0, -a0]], np.int32), np.array([R0]), np.array([g0, g0]), np.array([e0, e0]),
                    np.array([-v0, v0])))  # fmt: skip
    T, N = 64, 300
    for lo, hi in ((1e-6, 1e-3), (1e-3, 0.5), (0.5, 8.0)):
        g, e = I.dyadic(rng.uniform(lo, hi, N))
        cases.append((rng.integers(-127 * 768, 127 * 768 + 1, (T, N)).astype(np.int32),
                      rng.integers(0, I.SAT + 1, T).astype(np.int64), g, e))  # fmt: skip
    biases = [(None, I.to_q16(rng.standard_normal(a.shape[1]) * 4)) for a, *_ in cases]
    runs = [(*case, bias) for case, two in zip(cases, biases, strict=True) for bias in two]
    for a, R, g, e, bias in runs + big:
        y = np.zeros(a.shape, np.int32)
        intops.requantize(a, R, g, e, bias, y)
        want = I.round_div(a.astype(np.int64) * R[:, None] * g, 127 * (np.int64(1) << e))
        want = np.clip(want if bias is None else want + bias, -I.SAT, I.SAT)
        assert np.array_equal(y, want), (int(g[0]), int(e[0]))


def test_row_codes_are_exact_at_every_tie_and_on_both_sides_of_the_float64_bound():
    """Codes round half up: rows whose every element sits exactly on a tie (|v| = t (2c - 1)
    with m = 2 qmax t) or one off it, with m small, just below 2**45 (the float64 quotients)
    and above it (the int64 divisions)."""
    rows = []
    for qmax in (127, 7):
        c = np.arange(1, qmax + 1)
        for t in (1, 3, (intops.EXACT - 1) // (2 * qmax), intops.EXACT // (2 * qmax) + 1, 2**50 // (2 * qmax)):
            m = 2 * qmax * t
            for off in (-1, 0, 1):
                v = np.concatenate([[m, -m], t * (2 * c - 1) + off, -(t * (2 * c - 1) + off)])
                rows.append((qmax, np.minimum(v, m).astype(np.int64)))
    # exact ties where the float64 estimate falls just below the quotient c: floor(c 2m fl(1/(2m)))
    # = c - 1 (found by a seeded search over m < 2**45), so only the correction step is right
    # (the exact pass), and ties where the fast pass's y = |v| fl(qmax / m) + 1/2 falls just below c
    # (only the margin sends them to the exact pass)
    for c, m in ((1, 29628570479850), (3, 13788472014314), (5, 2059171680226), (64, 32114731857096),
                 (127, 13944655953152), (61, 13049372508264), (105, 7080824942716), (32, 16323889437500)):  # fmt: skip
        rows.append((127, np.array([m, m * (2 * c - 1) // 254, -(m * (2 * c - 1) // 254)], np.int64)))
    for qmax, v in rows:
        out = np.zeros((1, v.size), np.int8), np.zeros(1, np.int64)
        q, R = intops.codes_rows(v[None], qmax, out)
        q_ref, R_ref = I.codes(v[None], qmax)
        assert np.array_equal(q, q_ref) and np.array_equal(R, R_ref), (qmax, int(R_ref[0]))


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_one_pass_layers_equal_the_product_then_the_requantization(path, monkeypatch):
    """``bind_int_linear`` (product, requantization, residual add and LayerNorm codes, or
    i-GELU codes, in one pass) against ``integer.linear`` (+ residual, + norm codes, + gelu +
    codes): row counts around the kernel's tiles and row groups, without a bias, at exact ties
    (R = 127, g = 2**15, e = 16: every odd sum is a tie), beside them, and at saturation; None
    on a path without such a kernel."""
    path_name, packed = kernel(path)
    monkeypatch.setenv("TINYVIT158_KERNEL", path_name)
    rng = np.random.default_rng(8)
    for T, K, N in ((1, 192, 48), (5, 96, 96), (63, 192, 768), (65, 768, 192), (130, 48, 144)):
        codes = rng.integers(-1, 2, (N, K)).astype(np.int8)
        w = PreparedTernary(codes, np.ones(N, np.float32), packed=packed)
        xq = rng.integers(-127, 128, (T, K)).astype(np.int8)
        R = rng.integers(0, I.SAT + 1, T).astype(np.int64)
        R[: T // 2] = 127 * rng.integers(1, 4, T // 2)
        g, e = I.dyadic(rng.uniform(1e-4, 8.0, N))
        g[::3], e[::3] = 2**15, 16  # ties where R = 127
        g[1::3] += 1  # beside them
        for bias in (I.to_q16(rng.standard_normal(N) * 4), None):
            y = I.linear(xq, R, codes, g, e, bias)
            x = rng.integers(-I.SAT, I.SAT + 1, (T, N)).astype(np.int32)
            x[0] = I.SAT  # the residual stream's clamp
            want_x = np.clip(x + y, -I.SAT, I.SAT)
            out, q, Rq = np.zeros((T, N), np.int32), np.zeros((T, N), np.int8), np.zeros(T, np.int64)
            gq, gR = I.codes(I.gelu(y))
            G, Bn = I.to_q16(rng.standard_normal(N) * 3), I.to_q16(rng.standard_normal(N))
            E = int(np.rint(np.ldexp(1e-6, 32)))
            nq, nR = I.layer_norm_codes(want_x, G, Bn, E)
            x1 = x.copy()
            calls = [
                (bind_int_linear(xq, R, w, g, e, bias, out), [(out, y)]),
                (bind_int_linear(xq, R, w, g, e, bias, out, x1), [(x1, want_x)]),
                (bind_int_linear(xq, R, w, g, e, bias, gelu=(q, Rq)), [(q, gq), (Rq, gR)]),
                (bind_int_linear(xq, R, w, g, e, bias, out, x, norm=(G, Bn, E, (q, Rq))),
                 [(x, want_x), (q, nq), (Rq, nR)]),
            ]  # fmt: skip
            for bound, pairs in calls:
                if path_name not in INT_ROWS:
                    assert bound is None
                    continue
                bound[0](*bound[1])
                assert all(np.array_equal(got, want) for got, want in pairs), (T, K, N, bias is None)
            if path_name in INT_ROWS:  # arrays the kernel would write past: refused before any call
                for bad in (
                    {},
                    {"gelu": (q[:, :1], Rq)},
                    {"gelu": (q, Rq), "residual": x},
                    {"out": np.zeros((T + 1, N), np.int32)},
                ):
                    with pytest.raises(TinyViTError):
                        bind_int_linear(xq, R, w, g, e, bias, **bad)


def test_attention_is_exact_in_float_lanes_at_their_bounds_and_past_them():
    """The attention kernel against ``integer.attention``: random rows; rows at +-SAT with head
    dimension 64 (the float64 bounds' edge: |2 acc R_qk| reaches 0.98 * 2**53); at 128, rows
    past it (those units run in int64); 48 (no float lanes); all zeros; two equal tokens (every
    probability an exact tie)."""
    rng = np.random.default_rng(11)
    extreme = rng.choice([-I.SAT, I.SAT], (2 * 65, 3 * 192)).astype(np.int32)
    # head dimension 128, every q and k row one sign pattern times its own R near SAT: every
    # |acc| = qmax**2 hd and |2 acc R_qk| near 2**54, past the float64 bound (the int64 units)
    aligned = rng.integers(-I.SAT, I.SAT + 1, (2 * 65, 3 * 256))
    aligned[:, :512] = rng.choice([-1, 1], 512) * rng.integers(2**23, I.SAT + 1, (2 * 65, 1))
    aligned = aligned.astype(np.int32)
    cases = [
        (rng.integers(-(2**20), 2**20 + 1, (2 * 65, 3 * 192)).astype(np.int32), 2, 3, (8, 8, 1.0)),
        (rng.integers(-(2**17), 2**17 + 1, (2 * 65, 3 * 192)).astype(np.int32), 2, 3, (4, 4, 0.25)),
        (extreme, 2, 3, (8, 8, 1.0)),
        (extreme, 2, 3, (8, 6, 0.5)),
        (aligned, 2, 2, (8, 8, 1.0)),
        (rng.integers(-(2**20), 2**20 + 1, (2 * 17, 3 * 96)).astype(np.int32), 2, 2, (8, 8, 1.0)),
        (np.zeros((65, 3 * 192), np.int32), 1, 3, (8, 8, 1.0)),
        (np.tile(rng.integers(-(2**18), 2**18, (1, 3 * 192)), (4, 1)).astype(np.int32), 2, 3, (8, 8, 1.0)),
    ]
    for qkv, B, H, (bits, pbits, clip) in cases:
        T, D = qkv.shape[0], qkv.shape[1] // 3
        out, work = (np.zeros((T, D), np.int8), np.zeros(T, np.int64)), np.zeros((T, D), np.int32)
        q, R = intops.attention_codes(qkv, B, H, bits, pbits, clip, out, work)
        o, _ = I.attention(qkv.reshape(B, T // B, 3 * D), H, bits, pbits, clip)
        q_ref, R_ref = I.codes(o.reshape(T, D))
        assert np.array_equal(work, o.reshape(T, D)), (D // H, bits, int(np.abs(qkv).max()))
        assert np.array_equal(q, q_ref) and np.array_equal(R, R_ref)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_integers_equal_the_reference(path, name, monkeypatch):
    """array_equal, no tolerance: every batch size, thread count and kernel path gives the
    reference's integers, and ``forward`` their exact float64 view."""
    path_name, packed = kernel(path)
    monkeypatch.setenv("TINYVIT158_KERNEL", path_name)
    ck = random_checkpoint(CONFIGS[name], seed=3)
    engine, oracle = Engine(ck, packed=packed), I.IntegerOracle(ck)
    x = images(ck.config, 3, 7)
    want = oracle.integers(x)
    n = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, n)}):
            numba.set_num_threads(threads)
            assert np.array_equal(engine.integers(x), want), threads
            assert np.array_equal(np.concatenate([engine.integers(x[i : i + 1]) for i in range(3)]), want)
    finally:
        numba.set_num_threads(n)
    logits = engine(x)
    assert logits.dtype == np.float64 and np.array_equal(logits, want / I.ONE)


def test_engine_traces_the_reference_stages():
    ck = random_checkpoint(CONFIGS["cifar10-tiny-depth2"], seed=1)
    engine, oracle = Engine(ck), I.IntegerOracle(ck)
    x = images(ck.config, 2, 2)
    engine.trace, oracle.trace, engine.record, engine.timings = {}, {}, {}, {}
    engine(x)
    oracle.integers(x)
    # the probabilities and GELU's values stay inside their kernels (fused with the codes)
    skipped = {s for s in oracle.trace if s.endswith((".attn.p", ".mlp.gelu"))}
    assert set(engine.trace) == set(oracle.trace) - skipped
    for stage, v in engine.trace.items():
        assert np.array_equal(v, oracle.trace[stage]), stage
    assert set(engine.record) == {layer for layer in ck.config.linear_shapes() if ck.config.is_ternary(layer)} | {
        "head"
    }
    assert {"qkv", "attention+quant", "proj", "fc1", "gelu+quant", "fc2", "norm+quant", "head"} <= set(engine.timings)


def test_the_shipped_integer_file_meets_its_golden_vectors():
    """The engine on the golden inputs (Q16 images): the reference's Q16 logits, exactly."""
    golden = safetensors.numpy.load_file(str(ROOT / "weights" / "cifar10-tiny-int.golden.safetensors"))
    engine = Engine(load_weights(ROOT / "weights" / "cifar10-tiny-int.safetensors"))
    x = golden["input"].astype(np.float64) / I.ONE
    assert np.array_equal(engine.integers(x.astype(np.float32)), golden["logits"])
