"""bench runs and reports; it asserts no timings (those belong to benchmarks, not tests)."""

import json
import math
import subprocess
import sys

from tinyvit158.bench import NumpyFloatViT, erf32, kernel_table, merge_rounds
from tinyvit158.kernels import PATHS


def test_bench_smoke_json():
    out = subprocess.run(
        [sys.executable, "-m", "tinyvit158.bench", "--batch", "1", "2", "--repeats", "2", "--warmup", "0",
         "--variants", "engine", "engine-bitlinear", "numpy-fp32", "torch-fp32", "--layers", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    runs = {(r["variant"], r["batch"]) for r in report["results"]}
    assert runs == {(v, b) for v in ("engine", "engine-bitlinear", "numpy-fp32", "torch-fp32") for b in (1, 2)}
    for r in report["results"]:
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["peak_rss_bytes"] > 0 and r["weight_bytes"] > 0
        if r["variant"] == "engine":
            parts = set(r["layers_s"])
            assert {"qkv", "attention+quant", "proj", "norm+quant", "fc1+gelu+quant", "fc2"} <= parts
            assert "fc1+gelu+quant" in parts or {"fc1", "gelu+quant"} <= parts
        if r["variant"] == "engine-bitlinear":  # each ternary layer's input: norm or GELU, its own norm, codes
            assert "BitLinear norms" in r["desc"] and {"qkv", "norm+quant", "gelu+quant", "quant"} <= set(r["layers_s"])
    assert report["info"]["kernel_path"] in PATHS


def test_bench_contend_runs_a_busy_process_and_stops_it():
    out = subprocess.run(
        [sys.executable, "-m", "tinyvit158.bench", "--batch", "1", "--repeats", "2", "--warmup", "0",
         "--variants", "engine", "--contend", "--weights", "random"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "# contended: 1 busy process(es)" in out.stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "os.getppid() == parent" not in ps  # the busy process is gone


def test_a_variant_that_runs_too_long_is_reported_and_the_run_goes_on():
    from argparse import Namespace

    from tinyvit158.bench import run_child

    args = Namespace(model="cifar10-tiny", batch_now=1, repeats=2, warmup=0, max_seconds=1.0, layers=False,
                     weights="random", onnx=None, calib=None, agree=None, child_timeout=0.2)  # fmt: skip
    assert run_child("engine", args) == {"variant": "engine", "batch": 1, "error": "timed out after 0.2 s"}


def test_bench_rejects_bad_options():
    out = subprocess.run(
        [sys.executable, "-m", "tinyvit158.bench", "--model", "resnet"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "unknown preset" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "tinyvit158.bench", "--child-timeout", "0"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--child-timeout must be positive" in out.stderr


def test_kernel_table_rows():
    rows = kernel_table("cifar10-tiny", [9], seconds=0.001)
    assert {r["layer"] for r in rows} == {"patch_embed", "qkv", "proj", "fc1", "fc2"}
    assert all(r["generic_gops"] > 0 and r["sgemm_gops"] > 0 for r in rows)


def test_numpy_baseline_is_the_same_function():
    import numpy as np

    from tinyvit158 import get_preset
    from tinyvit158.weights import random_checkpoint

    x = np.linspace(-6, 6, 100_001).astype(np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.abs(erf32(x) - exact).max() < 5e-7  # A&S 7.1.26: 1.5e-7, evaluated in float32 (~4 ulps near 1)
    ck = random_checkpoint(get_preset("cifar10-tiny").replace(depth=2))
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    import torch

    from tinyvit158.train.model import QATViT

    with torch.inference_mode():
        expected = QATViT.float_twin(ck)(torch.from_numpy(images)).numpy()
    got = NumpyFloatViT(ck)(images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_merge_rounds_takes_the_median_round():
    def run(median, lo, hi, rss, layers):
        return {"variant": "engine", "batch": 1, "median_s": median, "min_s": lo, "max_s": hi, "repeats": 3,
                "peak_rss_bytes": rss, "load_s": 0.5, "layers_s": {"qkv": layers}}  # fmt: skip

    failed = {"variant": "engine", "error": "x"}
    rounds = [run(3.0, 2.0, 9.0, 10, 0.3), run(1.0, 0.5, 1.5, 30, 0.1), failed, run(2.0, 1.0, 2.5, 20, 0.2)]
    merged = merge_rounds(rounds)
    assert merged["median_s"] == 2.0 and (merged["min_s"], merged["max_s"]) == (0.5, 9.0)
    assert merged["peak_rss_bytes"] == 30 and merged["rounds"] == 3 and merged["repeats"] == 9
    assert merged["layers_s"] == {"qkv": 0.2}
    assert merge_rounds([{"variant": "engine", "batch": 1, "error": "boom"}])["error"] == "boom"


def test_instruction_rates_are_measured():
    from tinyvit158.kernels import cpu_has
    from tinyvit158.peak import instruction_rates

    rates = instruction_rates(seconds=0.01)
    assert rates["fma"] > 0
    for name, path in (("vpdpbusd", "vnni"), ("vpmaddubsw", "avx2")):
        assert (rates[name] > 0) if cpu_has(path) else rates[name] is None


def test_torch_baseline_is_plain_pytorch():
    """The PyTorch baselines are what a PyTorch user runs: standard modules, float32 at
    inference (not the twin's float64 LayerNorm and attention or the engine's GELU)."""
    import torch
    from torch import nn

    from tinyvit158 import get_preset
    from tinyvit158.train.model import GELU, LayerNorm, QATViT
    from tinyvit158.weights import random_checkpoint

    model = QATViT.float_twin(random_checkpoint(get_preset("cifar10-tiny").replace(depth=1)))
    modules = list(model.modules())
    assert not any(isinstance(m, (LayerNorm, GELU)) for m in modules)
    assert sum(isinstance(m, nn.LayerNorm) for m in modules) == 3 and any(isinstance(m, nn.GELU) for m in modules)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        torch.nn.functional.scaled_dot_product_attention = lambda q, k, v: calls.append(q.dtype) or original(q, k, v)
        try:
            model(torch.zeros(1, 3, 32, 32))
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
    assert calls == [torch.float32]


def test_peers_run_and_agree(tmp_path):
    """ONNX Runtime and OpenVINO, float and int8, on a small model: they run in the bench's
    children and their top-1 agrees with the engine's; each is skipped with its reason when
    its packages are missing (the bench extra)."""
    import pytest

    from tinyvit158 import get_preset, peers
    from tinyvit158.weights import random_checkpoint, save_weights

    missing = {v: peers.missing(v) for v in peers.PEERS if peers.missing(v)}
    if len(missing) == len(peers.PEERS):
        pytest.skip(f"the bench extra is not installed: {missing}")
    path = tmp_path / "small.safetensors"
    save_weights(path, random_checkpoint(get_preset("cifar10-tiny").replace(depth=2), seed=5))
    out = subprocess.run(
        [sys.executable, "-m", "tinyvit158.bench", "--batch", "2", "--repeats", "2", "--warmup", "0", "--weights",
         str(path), "--variants", "engine", *peers.PEERS, "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert set(report["skipped"]) == set(missing)
    for r in report["results"]:
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["desc"]
        if report["info"]["data"]:  # CIFAR-10 at hand: agreement with the engine on 256 test images
            assert r["agreement"] > 0.5, r  # a random model: near-ties are common; a bug gives ~10%
    kinds = {r["variant"]: r["desc"] for r in report["results"]}
    if "ort-int8" in kinds:
        assert "quantize_dynamic" in kinds["ort-int8"]
    if "openvino-int8" in kinds:
        assert "NNCF" in kinds["openvino-int8"] and "calibrated on 300" in kinds["openvino-int8"]
