"""The engine against the float64 oracle.

1. Every ternary layer: fed the same int8 input, the engine's int32 accumulators equal the
   oracle's exactly.
2. The whole model: the engine computes in float32, the oracle in float64, so a value that
   lands within float32 rounding of a quantizer tie (x / s_x = k + 1/2) may round to
   neighbouring codes in the two. We control for that instead of loosening tolerances:
   the oracle runs with a quantizer that checks every code where the two differ is such a
   tie (and differs by one), then continues with the engine's code. With the integer
   parts thus identical, the only differences left are float32 rounding, and the logits
   must agree to LOGIT_RTOL.
"""

import numpy as np
import pytest
from kernel_paths import KERNEL_PATHS
from kernel_paths import kernel as kernel_of

from tinyvit158 import TinyViTError, get_preset
from tinyvit158.engine import Engine
from tinyvit158.kernels import cpu_has_vnni, matmul
from tinyvit158.oracle import Oracle
from tinyvit158.quant import ACT_QMAX, quantize_activations, quantize_probabilities
from tinyvit158.weights import load_weights, random_checkpoint

# Where a code may differ: the oracle's unrounded value x / s_x lies within TIE_WINDOW of a
# rounding boundary. The engine's pre-quantization values carry float32 rounding (relative
# ~1e-7 per op, ~1e-6 after a block's norms and sums), i.e. ~127e-6 = 1.3e-4 code units at
# worst; measured differing codes lay within 4e-5 of a tie. 5e-4 leaves margin for unseen
# models while staying four orders of magnitude below a real bug (a code off by 1 unit).
TIE_WINDOW = 5e-4
# Logits, after replaying tie codes: float32 vs float64 norms, GELU, softmax and sums over
# K <= 768 terms. Measured max |diff| / max |logit| = 6e-7 over 9 random models; the bound is
# 1e-5 (16x margin).
LOGIT_RTOL = 1e-5
# Ties are rare: measured 1-8 differing codes out of 1.6-2.0 million.
MAX_TIE_FRACTION = 1e-4

CONFIGS = {
    "cifar10-tiny": get_preset("cifar10-tiny"),
    "deit-tiny-depth2": get_preset("deit-tiny").replace(depth=2),
    "cifar10-tiny-ternary3-channel-bitlinear": get_preset("cifar10-tiny").replace(
        depth=3, packing="ternary3", scale_granularity="channel", bitlinear_norm=True, ternary_head=True
    ),
    "cifar10-tiny-float-patch-no-qkv-bias": get_preset("cifar10-tiny").replace(
        depth=2, ternary_patch_embed=False, qkv_bias=False
    ),
    "cifar10-tiny-int8-attention": get_preset("cifar10-tiny").replace(depth=2, attention="int8"),
    "deit-tiny-depth1-attn4-clip-qk-norm-head-dim-40": get_preset("deit-tiny").replace(
        depth=1,
        dim=120,
        attention="int8",
        attention_bits=4,
        attention_prob_bits=4,
        attention_prob_clip=0.25,
        qk_norm=True,
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    ckpt = random_checkpoint(CONFIGS[request.param], seed=7)
    return ckpt, Engine(ckpt), Oracle(ckpt)


@pytest.fixture(
    autouse=True,
    params=KERNEL_PATHS,
)
def kernel(request, monkeypatch):
    """Run every engine test on every kernel path, VNNI with 1-byte and with 2-bit weights."""
    path, packed = kernel_of(request.param)
    monkeypatch.setenv("TINYVIT158_KERNEL", path)
    if "model" in request.fixturenames:
        for w in request.getfixturevalue("model")[1].ternary.values():
            w.packed = packed
    return request.param


def images(cfg, b, seed):
    return np.random.default_rng(seed).standard_normal((b, 3, cfg.image_size, cfg.image_size)).astype(np.float32)


def test_every_layer_accumulates_exactly(model):
    ckpt, engine, oracle = model
    rng = np.random.default_rng(0)
    assert engine.ternary, "no ternary layers to test"
    for layer, w in engine.ternary.items():
        x_q = rng.integers(-127, 128, size=(ckpt.config.num_tokens, w.in_features)).astype(np.int8)
        x_q[0] = 127  # the largest accumulators
        acc = matmul(x_q, w)  # on the path the kernel fixture chose
        expected = x_q.astype(np.int64) @ ckpt.ternary(layer)[0].astype(np.int64).T
        assert np.array_equal(acc, expected), layer
        assert np.array_equal(oracle.accumulate(x_q, layer), expected.astype(np.float64)), layer


class TieReplay:
    """An oracle quantizer that accepts the engine's codes where they differ only at ties
    (activations of every linear layer; with int8 attention also its q, k, v and
    probabilities: ``probs`` is the oracle's ``prob_quantizer``)."""

    def __init__(self, engine_codes):
        self.engine_codes = engine_codes
        self.differing = 0
        self.total = 0

    def _replay(self, site, x_q, unrounded):
        theirs = self.engine_codes[site]
        assert theirs.shape == x_q.shape, site
        diff = x_q != theirs
        self.total += diff.size
        if diff.any():
            to_tie = np.abs(np.abs(unrounded - np.floor(unrounded)) - 0.5)
            assert np.all(to_tie[diff] < TIE_WINDOW), f"{site}: codes differ away from a tie"
            assert np.all(np.abs(x_q[diff].astype(int) - theirs[diff]) == 1), f"{site}: codes differ by more than 1"
            self.differing += int(diff.sum())
        return theirs

    def __call__(self, x, site, qmax=ACT_QMAX):
        x_q, s_x = quantize_activations(x, qmax)
        return self._replay(site, x_q, x / s_x[..., None]), s_x

    def probs(self, p, site, bits, clip):
        p_q, mult = quantize_probabilities(p, bits, clip)
        return self._replay(site, p_q, p * mult), mult


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_the_oracle(model, seed):
    ckpt, engine, _ = model
    x = images(ckpt.config, 3, seed)
    engine.record = {}
    try:
        got = engine(x)
        replay = TieReplay(engine.record)
    finally:
        engine.record = None
    expected = Oracle(ckpt, quantizer=replay, prob_quantizer=replay.probs)(x)
    assert replay.total > 0 and replay.differing <= MAX_TIE_FRACTION * replay.total
    assert got.dtype == np.float32 and got.shape == (3, ckpt.config.num_classes)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_RTOL * scale)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_RTOL * scale
    assert np.array_equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def test_free_running_engine_stays_close(model):
    # Without replay, a few tie flips move logits a little; far less than the logits' spread.
    ckpt, engine, oracle = model
    x = images(ckpt.config, 2, 5)
    got, expected = engine(x), oracle(x)
    assert np.abs(got - expected).max() < 0.1 * np.ptp(expected, axis=1).min()


def test_batch_does_not_change_results(model):
    ckpt, engine, _ = model
    x = images(ckpt.config, 3, 9)
    together = engine(x)
    alone = np.concatenate([engine(x[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6 * np.abs(together).max())


def test_engine_checks_its_input():
    engine = Engine(random_checkpoint(get_preset("cifar10-tiny").replace(depth=1)))
    with pytest.raises(TinyViTError, match=r"\(B, 3, 32, 32\)"):
        engine(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(TinyViTError, match=r"\(B, 3, 32, 32\)"):
        engine(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(TinyViTError, match="float images"):
        engine(np.zeros((1, 3, 32, 32), np.uint8))


def test_traces_have_the_same_stages(model):
    ckpt, engine, oracle = model
    x = images(ckpt.config, 1, 3)
    engine.trace, oracle.trace = {}, {}
    try:
        engine(x)
        oracle(x)
        assert set(engine.trace) == set(oracle.trace) - {f"blocks.{i}.attn" for i in range(ckpt.config.depth)}
        for stage, value in engine.trace.items():
            assert value.shape == oracle.trace[stage].shape, stage
        probs = oracle.trace["blocks.0.attn"]
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    finally:
        engine.trace = oracle.trace = None


def test_reused_buffers_never_leak_between_calls(weights):
    """The workspace is reused across calls: results must not depend on what ran before,
    and returned arrays must not be overwritten by the next call."""
    engine = Engine(load_weights(weights))
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((3, 3, 32, 32)).astype(np.float32) for _ in range(2))
    first = engine(a)
    kept = first.copy()
    engine(b)
    engine(b[:1])  # another batch size replaces the buffers
    np.testing.assert_array_equal(engine(a), kept)
    np.testing.assert_array_equal(first, kept)
    assert np.array_equal(Engine(load_weights(weights))(b), engine(b))


def _checked_linear(x_q, s_x, w, out, accumulate):
    from tinyvit158.kernels import linear

    return linear, (x_q, s_x, w, None, out if accumulate else None, None if accumulate else out)


def _checked_linear_gelu_quantize(x_q, s_x, w, q, s):
    from tinyvit158.kernels import linear_gelu_quantize

    return linear_gelu_quantize, (x_q, s_x, w, (q, s))


def test_bound_plan_equals_the_checked_steps(monkeypatch):
    """The engine's plan (raw kernels bound once per batch size where the path has them)
    computes what the checked kernel functions compute, step for step: logits, recorded
    codes, traced stages, parts."""
    from tinyvit158 import engine as engine_module
    from tinyvit158.kernels import layernorm_quantize

    cfg = CONFIGS["cifar10-tiny"].replace(depth=2)
    engine = Engine(random_checkpoint(cfg, seed=3))
    images = np.random.default_rng(0).standard_normal((3, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    runs = []
    for checked in (False, True):
        if checked:  # every step through the checked functions, as a caller outside the plan would
            monkeypatch.setattr(engine_module, "bind_layernorm_quantize", lambda *a: (layernorm_quantize, a))
            monkeypatch.setattr(engine_module, "bind_linear", _checked_linear)
            monkeypatch.setattr(engine_module, "bind_linear_gelu_quantize", _checked_linear_gelu_quantize)
            engine._workspace.__dict__.clear()  # rebuild the plan with the checked functions
        engine.record, engine.trace, engine.timings = {}, {}, {}
        logits = engine(images)
        again = engine(images)  # the second call reuses the plan and the buffers
        runs.append((logits, again, engine.record, engine.trace, set(engine.timings)))
    (a, a2, rec_a, tr_a, parts_a), (b, b2, rec_b, tr_b, parts_b) = runs
    assert np.array_equal(a, b) and np.array_equal(a2, a) and np.array_equal(b2, b)
    assert rec_a.keys() == rec_b.keys() and all(np.array_equal(rec_a[k], rec_b[k]) for k in rec_a)
    assert tr_a.keys() == tr_b.keys() and all(np.array_equal(tr_a[k], tr_b[k]) for k in tr_a)
    assert parts_a == parts_b == {"patch_embed", "quant", "qkv", "attention+quant", "proj", "norm+quant",
                                  "fc1+gelu+quant", "fc2", "head"}  # fmt: skip


def test_one_executor_times_records_and_traces_every_kind_of_block():
    """BitLinear blocks run through the same step list and loop: every ternary layer's
    input codes recorded, every part timed, every oracle stage traced but the probabilities."""
    cfg = CONFIGS["cifar10-tiny"].replace(depth=2, bitlinear_norm=True)
    ckpt = random_checkpoint(cfg, seed=4)
    engine, oracle = Engine(ckpt), Oracle(ckpt)
    x = images(cfg, 2, 1)
    engine.record, engine.trace, engine.timings, oracle.trace = {}, {}, {}, {}
    try:
        engine(x)
        oracle(x)
        assert set(engine.record) == {layer for layer in cfg.linear_shapes() if cfg.is_ternary(layer)}
        assert {"attention", "qkv", "proj", "fc1", "fc2", "head", "norm+quant", "gelu+quant", "quant"} <= set(
            engine.timings
        )
        assert set(engine.trace) == set(oracle.trace) - {f"blocks.{i}.attn" for i in range(cfg.depth)}
    finally:
        engine.record = engine.trace = engine.timings = oracle.trace = None


def _bitlinear_steps(x, norm, act, own, out=None):
    """A BitLinear layer's input codes as three separate steps: the block's norm or GELU,
    then the layer's own LayerNorm and codes."""
    from tinyvit158.kernels import gelu, layernorm, layernorm_quantize

    def steps():  # at call time: the plan binds buffers whose contents change
        return layernorm_quantize(layernorm(x, *norm) if norm is not None else gelu(x) if act else x, *own, out)

    return steps, ()


@pytest.mark.parametrize("norm, act", [(True, False), (False, True), (False, False)])
def test_bitlinear_input_kernel_is_the_steps_in_one_pass(norm, act):
    from tinyvit158.kernels import bind_bitlinear_quantize

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((37, 192)) * rng.uniform(0.01, 30, (37, 1))).astype(np.float32)
    x[3] = 0.0  # a constant row: the eps branch of both norms
    ln = lambda s: (rng.normal(1, 0.3, 192).astype(np.float32), rng.normal(0, 0.2, 192).astype(np.float32), s)  # noqa: E731
    first, own = (ln(1e-6) if norm else None), ln(1e-5)
    fn, args = bind_bitlinear_quantize(x, first, act, own)
    q, s = fn(*args)
    fn, args = _bitlinear_steps(x, first, act, own)
    q0, s0 = fn(*args)
    assert np.array_equal(q, q0) and np.array_equal(s, s0)


def test_bitlinear_plan_equals_its_steps(monkeypatch):
    """The BitLinear model's fused plan gives the logits of the plan with every layer's
    input made step by step, bit for bit (1 and 64 images)."""
    import tinyvit158.engine as engine_module

    cfg = CONFIGS["cifar10-tiny"].replace(depth=2, bitlinear_norm=True)
    ckpt = random_checkpoint(cfg, seed=6)
    x = images(cfg, 64, 2)
    fused = Engine(ckpt)
    a, a1 = fused(x), fused(x[:1])
    monkeypatch.setattr(engine_module, "bind_bitlinear_quantize", _bitlinear_steps)
    steps = Engine(ckpt)
    assert np.array_equal(a, steps(x)) and np.array_equal(a1, steps(x[:1]))


@pytest.mark.skipif(not cpu_has_vnni(), reason="CPU lacks AVX-512 VNNI")
def test_plan_follows_the_kernel_path(monkeypatch):
    """A plan bound on the VNNI path is not used once TINYVIT158_KERNEL asks for generic."""
    from tinyvit158.kernels import linear_gelu_quantize

    engine = Engine(random_checkpoint(CONFIGS["cifar10-tiny"].replace(depth=2), seed=0))
    images = np.zeros((1, 3, 32, 32), np.float32)
    monkeypatch.setenv("TINYVIT158_KERNEL", "vnni")
    vnni_logits = engine(images)
    monkeypatch.setenv("TINYVIT158_KERNEL", "generic")
    generic_logits = engine(images)
    plans = {k[1]: v for k, v in engine._workspace.__dict__["bufs"].items() if k[0] == "plan"}
    fc1 = {path: [s.fn for s in plan.features if s.part == "fc1+gelu+quant"] for path, plan in plans.items()}
    assert fc1["generic"] == [linear_gelu_quantize] * 2 and linear_gelu_quantize not in fc1["vnni"]
    assert np.array_equal(generic_logits, vnni_logits)  # the two paths are bit-identical
