"""The golden vectors of the shipped integer model, and the conformance command that checks
another implementation against them."""

import numpy as np
import pytest
import safetensors.numpy

from tinyvit158.conform import GOLDEN_NAME, MODEL_NAME, main, read, run, shipped


@pytest.fixture(scope="module")
def golden():
    return read(shipped(GOLDEN_NAME))


def test_the_reference_reproduces_the_golden_vectors_and_hashes(golden):
    logits, steps, hashes = run(shipped(MODEL_NAME), golden["input"])
    assert np.array_equal(logits, golden["logits"]) and np.array_equal(hashes, golden["trace_sha256"])
    assert all(np.array_equal(v, golden[k]) for k, v in steps.items()) and len(steps) == 5


def test_the_pytorch_twin_gives_the_golden_logits(golden):
    torch = pytest.importorskip("torch", reason="the train extra is not installed")
    from tinyvit158.integer import FRAC
    from tinyvit158.train.model import QATViT
    from tinyvit158.weights import load_weights

    twin = QATViT.from_checkpoint(load_weights(shipped(MODEL_NAME)))
    with torch.no_grad():
        _, ints = twin.integer_forward(torch.from_numpy(golden["input"].astype(np.float32) / 2**FRAC))
    assert np.array_equal(ints.numpy(), golden["logits"])


def test_an_own_dump_conforms_and_a_broken_one_says_where(tmp_path, golden, capsys):
    fast = tmp_path / "fast.safetensors"
    assert main(["--dump", str(fast)]) == 0  # the fast engine: the logits and four of the five steps
    assert main([str(fast)]) == 0 and "conforms" in capsys.readouterr().out
    assert "step.blocks.0.attn.p" not in safetensors.numpy.load_file(str(fast))
    own = tmp_path / "own.safetensors"
    assert main(["--dump", str(own), "--engine", "oracle"]) == 0
    assert main([str(own)]) == 0 and "conforms" in capsys.readouterr().out
    dump = dict(safetensors.numpy.load_file(str(own)))
    dump["step.blocks.0.attn.proj"][12, 40] += 1
    dump["logits"][3, 7] -= 1
    broken = tmp_path / "broken.safetensors"
    safetensors.numpy.save_file(dump, str(broken))
    assert main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("differs: step.blocks.0.attn.proj: 1 of 12480 values differ; the first at index (12, 40)")
    del dump["step.blocks.0.attn.proj"]
    safetensors.numpy.save_file(dump, str(broken))
    assert main([str(broken)]) == 1
    assert "logits: 1 of 160 values differ; the first at index (3, 7)" in capsys.readouterr().out


def test_bad_dumps_are_one_line(tmp_path, capsys):
    (tmp_path / "text.safetensors").write_text("not a dump")
    safetensors.numpy.save_file({"x": np.zeros(3, np.int64)}, str(tmp_path / "nologits.safetensors"))
    cases = [("text.safetensors", "not a readable safetensors file"), ("nologits.safetensors", "no 'logits'"),
             ("missing.safetensors", "no such file")]  # fmt: skip
    for name, match in cases:
        assert main([str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and match in err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
