"""The command line, run for real in a subprocess."""

import json
from pathlib import Path

import pytest
from conftest import run_module

from tinyvit158 import get_preset
from tinyvit158.weights import random_checkpoint, save_weights

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(*args):
    return run_module("tinyvit158.predict", *args)


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


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit gray) and holds one empty IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image\n")
    jpg = (EXAMPLES / "cat.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.new("RGB", (40, 40), (10, 200, 30)).save(d / "whole.png")
    png = (d / "whole.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) - 30])
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "one.png")
    (d / "bomb.png").write_bytes(png_header(20000, 20000))
    (d / "no_images").mkdir()
    (d / "no_images" / "readme.txt").write_text("nothing to see")
    weights_dir = tmp_path_factory.mktemp("wbad")
    cfg = get_preset("cifar10-tiny").replace(depth=1)
    save_weights(weights_dir / "good.safetensors", random_checkpoint(cfg))
    data = (weights_dir / "good.safetensors").read_bytes()
    (weights_dir / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    import safetensors.numpy

    t = random_checkpoint(cfg).tensors
    meta = {"format": "tinyvit158", "format_version": "1", "config": cfg.replace(depth=2).to_json(), "source": "{}"}
    safetensors.numpy.save_file(t, str(weights_dir / "mismatched.safetensors"), meta)
    return d, weights_dir


@pytest.mark.parametrize(
    "name,needle",
    [
        ("missing.png", "no such file"),
        ("empty.png", "an empty file"),
        ("text.png", "not an image Pillow can read"),
        ("truncated.jpg", "corrupt or truncated"),
        ("truncated.png", "corrupt or truncated"),
        ("one.png", "1x1 pixels"),
        ("bomb.png", "decompression bomb"),
        ("no_images", "folder holds no image files"),
    ],
)
def test_bad_images_are_one_line_errors(bad_files, weights, name, needle):
    out = run(bad_files[0] / name, "--weights", weights)
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize(
    "name,needle",
    [
        ("missing.safetensors", "no such weight file"),
        ("truncated.safetensors", "not a readable safetensors file"),
        ("mismatched.safetensors", "missing"),
    ],
)
def test_bad_weight_files_are_one_line_errors(bad_files, name, needle):
    out = run(EXAMPLES / "cat.jpg", "--weights", bad_files[1] / name)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("k", ["0", "11", "-1"])
def test_top_k_out_of_range_is_a_usage_error(weights, k):
    out = run(EXAMPLES / "cat.jpg", "--weights", weights, "--top-k", k)
    assert out.returncode == 2 and "--top-k must be between 1 and 10" in out.stderr and "Traceback" not in out.stderr


def test_good_images_are_classified_despite_bad_ones(bad_files, weights):
    out = run(EXAMPLES / "cat.jpg", bad_files[0] / "text.png", EXAMPLES / "dog.jpg", "--weights", weights, "--json")
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"].split("/")[-1] for r in records] == ["cat.jpg", "text.png", "dog.jpg"]
    assert "top_k" in records[0] and "error" in records[1] and "top_k" in records[2]
    assert "text.png" in out.stderr and "Traceback" not in out.stderr


def test_16bit_gray_png_and_cmyk_jpeg_work(tmp_path, weights):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20).save(tmp_path / "g16.png")
    Image.new("CMYK", (40, 40), (0, 200, 180, 40)).save(tmp_path / "cmyk.jpg")
    out = run(tmp_path / "g16.png", tmp_path / "cmyk.jpg", "--weights", weights)
    assert out.returncode == 0, out.stderr
    assert "g16.png" in out.stdout and "cmyk.jpg" in out.stdout


def test_help_documents_options_and_exit_codes():
    out = run("--help")
    assert out.returncode == 0
    for needle in ["--weights", "--top-k", "--json", "--engine", "exit status", "0 ", "1 ", "2 ", "centre square"]:
        assert needle in out.stdout, needle


def test_a_slow_first_call_says_why():
    """On a new install the first call compiles the kernels (tens of seconds): a line on
    stderr says so, and only when a call is that slow."""
    import io
    import time

    from tinyvit158.runtime import COMPILE_NOTICE, first_run_notice

    err = io.StringIO()
    with first_run_notice(after_s=0.05, stream=err):
        time.sleep(0.3)
    assert err.getvalue().strip() == COMPILE_NOTICE
    quiet = io.StringIO()
    with first_run_notice(after_s=0.5, stream=quiet):
        pass
    time.sleep(0.7)
    assert quiet.getvalue() == ""


def test_json_has_a_record_for_every_file_in_order(tmp_path):
    from conftest import run_module

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = run_module("tinyvit158.predict", "--json", "examples/cat.jpg", bad, "https://example.com/dog.jpg",
                     "examples/dog.jpg")  # fmt: skip
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in records] == ["examples/cat.jpg", str(bad), "https://example.com/dog.jpg",
                                            "examples/dog.jpg"]  # fmt: skip
    assert "top_k" in records[0] and "top_k" in records[3]
    assert "not an image" in records[1]["error"]
    assert "a URL; only local files are read" in records[2]["error"]
    assert len(out.stderr.strip().splitlines()) == 2  # one line for each failed file
