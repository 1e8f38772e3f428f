import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_module
from fake_cifar import make_images, write_jpeg_zip, write_tarball

from tinyvit158.config import CIFAR10_CLASSES
from tinyvit158.data import DataError, data_dir_from_env, load_cifar10

ROOT = Path(__file__).resolve().parents[1]
DATA = data_dir_from_env()
needs_cifar = pytest.mark.skipif(DATA is None, reason="TINYVIT158_DATA is not set (CI sets it)")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 60 test images as a JPEG zip, an extracted folder, a tarball and extracted batches."""
    root = tmp_path_factory.mktemp("layouts")
    images, labels = make_images(6, 3)
    zpath = write_jpeg_zip(root / "cifar10-test-jpg.zip", "test", images, labels)
    decoded = load_cifar10(zpath, "test")  # JPEG is lossy: the other layouts get the decoded pixels
    with zipfile.ZipFile(zpath) as z:
        z.extractall(root / "extracted")
    write_tarball(root / "cifar-10-python.tar.gz", make_images(1, 0), (decoded.images, decoded.labels))
    with tarfile.open(root / "cifar-10-python.tar.gz") as t:
        t.extractall(root / "batches", filter="data")
    return root, decoded


def test_every_layout_reads_the_same_images(layouts):
    root, ref = layouts
    for path in [root, root / "cifar10-test-jpg.zip", root / "extracted", root / "extracted" / "test"]:
        d = load_cifar10(path, "test")
        assert np.array_equal(d.images, ref.images) and np.array_equal(d.labels, ref.labels), path
    for path in [root / "cifar-10-python.tar.gz", root / "batches", root / "batches" / "cifar-10-batches-py"]:
        d = load_cifar10(path, "test")
        assert np.array_equal(d.images, ref.images) and np.array_equal(d.labels, ref.labels), path


def test_folder_order_interleaves_classes(layouts):
    d = load_cifar10(layouts[0] / "cifar10-test-jpg.zip", "test", limit=20)
    assert d.labels.tolist() == list(range(10)) * 2


def test_bad_layouts(tmp_path, layouts):
    root, _ = layouts
    with pytest.raises(DataError, match="no such file"):
        load_cifar10(tmp_path / "nope", "test")
    bad = tmp_path / "partial" / "test"
    for c in CIFAR10_CLASSES[:9]:
        (bad / c).mkdir(parents=True)
        (bad / c / "0.jpg").write_bytes((root / "extracted" / "test" / c / "0000.jpg").read_bytes())
    with pytest.raises(DataError, match="missing class folder.*truck"):
        load_cifar10(tmp_path / "partial", "test")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a zip"):
        load_cifar10(tmp_path / "notes.txt", "test")
    with pytest.raises(DataError, match="limit"):
        load_cifar10(root, "test", limit=0)


def test_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    data = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    path = tmp_path / "cifar-10-batches-py"
    path.mkdir()
    (path / "test_batch").write_bytes(data)
    with pytest.raises(DataError, match="refusing to load"):
        load_cifar10(path, "test")


def evaluate(*args):
    return run_module("tinyvit158.evaluate", *args)


def test_evaluate_gives_identical_results_on_zip_and_tarball(layouts, weights):
    root, _ = layouts
    results = []
    for path in [root / "cifar10-test-jpg.zip", root / "cifar-10-python.tar.gz"]:
        out = evaluate("--data", path, "--weights", weights, "--json")
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        results.append((r["accuracy"], r["per_class"], r["confusion"]))
        assert r["classes"] == list(r["per_class"]) and len(r["confusion"]) == len(r["classes"])
    assert results[0] == results[1]
    table = evaluate("--data", root / "cifar10-test-jpg.zip", "--weights", weights).stdout.splitlines()
    header = next(i for i, line in enumerate(table) if "confusion (rows: label" in line)
    assert table[header + 1].split() == [c[:4] for c in r["classes"]]  # the columns are labelled


def test_evaluate_bad_data_is_one_line(tmp_path, weights):
    out = evaluate("--data", tmp_path / "missing", "--weights", weights)
    assert out.returncode == 1 and "no such file" in out.stderr and "Traceback" not in out.stderr


@needs_cifar
def test_real_cifar10_test_split():
    d = load_cifar10(DATA, "test")
    assert d.images.shape == (10000, 32, 32, 3)
    assert np.bincount(d.labels).tolist() == [1000] * 10


@needs_cifar
def test_evaluate_on_real_data_shows_progress_and_accuracy(weights):
    out = evaluate("--data", DATA / "cifar10-test-jpg.zip", "--limit", "200", "--weights", weights)
    assert out.returncode == 0, out.stderr
    assert "top-1 accuracy:" in out.stdout and "images" in out.stdout
    assert "img" in out.stderr  # the tqdm progress bar


def test_evaluate_missing_class_folder_is_one_line(tmp_path, layouts, weights):
    root, _ = layouts
    with zipfile.ZipFile(root / "cifar10-test-jpg.zip") as z, zipfile.ZipFile(tmp_path / "partial.zip", "w") as out:
        for name in z.namelist():
            if "/dog/" not in name:
                out.writestr(name, z.read(name))
    res = evaluate("--data", tmp_path / "partial.zip", "--weights", weights)
    assert res.returncode == 1 and "missing class folder(s) dog" in res.stderr and "Traceback" not in res.stderr


def test_cli_dispatches_subcommands(weights):
    res = subprocess.run(
        [sys.executable, "-m", "tinyvit158", "predict", str(ROOT / "examples" / "cat.jpg"), "--weights", str(weights)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0 and "cat.jpg" in res.stdout, res.stderr
    bad = subprocess.run([sys.executable, "-m", "tinyvit158", "fly"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
