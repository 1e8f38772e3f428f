"""``python -m tinyvit158.convert``: a weight file with other numerics, tensors unchanged."""

import numpy as np
import pytest
from conftest import run_module

from tinyvit158 import get_preset
from tinyvit158.convert import change_numerics
from tinyvit158.engine import Engine
from tinyvit158.errors import TinyViTError
from tinyvit158.oracle import Oracle
from tinyvit158.weights import load_weights, random_checkpoint, save_weights


def test_int8_attention_from_a_weight_file(tmp_path, weights):
    out = tmp_path / "int8.safetensors"
    proc = run_module("tinyvit158.convert", weights, "--out", out, "--set", "attention=int8", "--set=attention_bits=4")
    assert proc.returncode == 0, proc.stderr
    src, got = load_weights(weights), load_weights(out)
    assert (got.config.attention, got.config.attention_bits, got.config.attention_prob_bits) == ("int8", 4, 8)
    assert got.tensors.keys() == src.tensors.keys()
    assert all(np.array_equal(got.tensors[k], src.tensors[k]) for k in src.tensors)
    assert got.source["converted_from"]["changes"] == {"attention": "int8", "attention_bits": 4}
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert not np.allclose(Engine(got)(x), Engine(src)(x))  # the attention did change
    np.testing.assert_allclose(Engine(got)(x), Oracle(got)(x), rtol=0, atol=0.05 * np.ptp(Oracle(got)(x)))


def test_repacking_keeps_the_codes(tmp_path):
    ckpt = random_checkpoint(get_preset("cifar10-tiny").replace(depth=1), seed=3)
    t3 = change_numerics(ckpt, {"packing": "ternary3"})
    save_weights(tmp_path / "t3.safetensors", t3)
    back = load_weights(tmp_path / "t3.safetensors")
    for layer in ckpt.config.linear_shapes():
        if ckpt.config.is_ternary(layer):
            assert np.array_equal(back.ternary(layer)[0], ckpt.ternary(layer)[0])
    assert back.tensors["blocks.0.attn.qkv.weight_packed"].shape[1] == -(-192 // 5)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--set", "dim=96"], "cannot change without training"),
        (["--set", "qk_norm=true"], "cannot change without training"),
        (["--set", "attention=int4"], "attention is 'int4'"),
        (["--set", "attention"], "expected KEY=VALUE"),
    ],
)
def test_refusals_are_one_line(tmp_path, weights, args, match):
    proc = run_module("tinyvit158.convert", weights, "--out", tmp_path / "x.safetensors", *args)
    assert proc.returncode == 1 and match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_shape_changes_are_refused_in_the_api():
    with pytest.raises(TinyViTError):
        change_numerics(random_checkpoint(get_preset("cifar10-tiny").replace(depth=1)), {"heads": 4})
