"""The command line, run for real in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyvit158 import get_preset
from tinyvit158.weights import random_checkpoint, save_weights

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "tinyvit158.predict", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(path, random_checkpoint(get_preset("cifar10-tiny").replace(depth=1)))
    return path


def test_predicts_a_folder_as_json(weights):
    out = run(EXAMPLES, "--weights", weights, "--json", "--top-k", "3")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(list(EXAMPLES.glob("*.jpg"))) == 10
    for row in rows:
        probs = [t["probability"] for t in row["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_oracle_and_fast_engine_agree_on_labels(weights):
    fast = run(EXAMPLES / "cat.jpg", "--weights", weights, "--json", "--engine", "fast")
    slow = run(EXAMPLES / "cat.jpg", "--weights", weights, "--json", "--engine", "oracle")
    assert fast.returncode == slow.returncode == 0
    assert json.loads(fast.stdout)["top_k"][0]["label"] == json.loads(slow.stdout)["top_k"][0]["label"]


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["missing.png"], 1, "no such file"),
        (["examples/cat.jpg", "--weights", "missing.safetensors"], 1, "no such weight file"),
        (["examples/cat.jpg", "--top-k", "0"], 2, "--top-k must be between 1 and 10"),
    ],
)
def test_bad_input_is_one_line(args, code, needle, weights):
    if "--weights" not in args:
        args = [*args, "--weights", str(weights)]
    out = run(*args)
    assert out.returncode == code
    assert needle in out.stderr and "Traceback" not in out.stderr
