"""One command line: ``tinyvit158 {predict,evaluate,bench,convert,train,export,average,checkpoint}``,
``--version``, usage lines that name the command as it was typed, help texts with defaults,
and TINYVIT158_DATA wherever --data is taken."""

import os
import subprocess
import sys

import pytest

from tinyvit158 import __version__
from tinyvit158.cli import COMMANDS


def tinyvit158(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinyvit158", *args], capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip


def test_version_and_help():
    assert tinyvit158("--version").stdout.strip() == f"tinyvit158 {__version__}"
    for args in ([], ["help"], ["--help"]):
        out = tinyvit158(*args)
        assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_named_as_typed(name):
    out = tinyvit158(name, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: tinyvit158 {name}")


def test_train_help_describes_every_option_with_its_default():
    out = " ".join(tinyvit158("train", "--help").stdout.split())  # argparse wraps lines
    assert "peak learning rate (AdamW) (default: 0.001)" in out and "(default: 'cifar10-tiny')" in out
    assert "TINYVIT158_DATA" in out


def test_bench_takes_preset_like_train():
    out = tinyvit158("bench", "--preset", "resnet")
    assert out.returncode == 2 and "unknown preset" in out.stderr


def test_train_without_data_says_how_to_give_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TINYVIT158_DATA"}
    out = tinyvit158("train", "--out", str(tmp_path / "run"), env=env)
    assert out.returncode == 2 and "TINYVIT158_DATA" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_predict_says_every_image_gets_one_of_the_classes():
    from tinyvit158.predict import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "Every image gets one of the model's classes" in text and "none of these" in text
