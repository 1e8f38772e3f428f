"""evaluate on labelled image folders (ROOT/<class>/<image>), decoded in worker processes."""

import json

import numpy as np
import pytest
from conftest import run_module
from PIL import Image

from tinyvit158.config import get_preset
from tinyvit158.folders import FolderError, is_labelled_folder, load_labelled_folder
from tinyvit158.pipeline import stream

CFG = get_preset("cifar10-tiny")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes, mixed formats and sizes, a few images each."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "ship", "truck"]):
        (root / name).mkdir()
        for i, (fmt, size) in enumerate([("png", (32, 32)), ("jpg", (48, 40)), ("bmp", (64, 64)), ("jpg", (20, 36))]):
            rgb = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            rgb[..., c] = 255  # each class tinted its own way
            Image.fromarray(rgb).save(root / name / f"{i}.{fmt}")
    return root


def test_folder_paths_labels_and_order(folder):
    data = load_labelled_folder(folder, CFG)
    assert len(data.paths) == 12 and is_labelled_folder(folder)
    assert data.labels.tolist() == [3] * 4 + [8] * 4 + [9] * 4  # cat, ship, truck in the model's classes
    assert data.names[0] == "cat/0.png"


def test_worker_processes_give_the_same_images_in_order(folder):
    data = load_labelled_folder(folder, CFG)
    one = [(i, x) for i, x, _ in stream(data.paths, CFG, batch=5, workers=1)]
    two = [(i, x) for i, x, _ in stream(data.paths, CFG, batch=5, workers=2)]
    assert [i for i, _ in one] == [i for i, _ in two] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(one, two, strict=True))


def test_evaluate_local_and_worker_pool_agree(folder, weights):
    results = []
    for workers in ("1", "2"):
        out = run_module("tinyvit158.evaluate", "--data", folder, "--weights", weights, "--workers", workers, "--json",
                         "--batch", "5")  # fmt: skip
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout))
    a, b = results
    assert a["images"] == 12 and a["accuracy"] == b["accuracy"] and a["confusion"] == b["confusion"]
    assert a["predictions"] == b["predictions"] and a["predictions"][0]["image"] == "cat/0.png"


def test_class_map(tmp_path, folder, weights):
    import shutil

    root = tmp_path / "renamed"
    shutil.copytree(folder, root)
    (root / "cat").rename(root / "n02123045")
    (tmp_path / "map.json").write_text(json.dumps({"n02123045": "cat"}))
    out = run_module("tinyvit158.evaluate", "--data", root, "--weights", weights, "--json", "--class-map",
                     tmp_path / "map.json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"] == 12


@pytest.mark.parametrize(
    "layout, match",
    [
        ("empty class", "class folder holds no images"),
        ("unknown class", "is not one of the model's classes (airplane, automobile"),
        ("no class folders", "no class folders"),
        ("file instead of folder", "a file where a class folder belongs"),
    ],
)
def test_wrong_layouts_fail_in_one_line(tmp_path, weights, layout, match):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cat").mkdir()
    Image.new("RGB", (32, 32)).save(root / "cat" / "a.png")
    if layout == "empty class":
        (root / "dog").mkdir()
    elif layout == "unknown class":
        (root / "zebra").mkdir()
        Image.new("RGB", (32, 32)).save(root / "zebra" / "z.png")
    elif layout == "no class folders":
        (root / "cat" / "a.png").unlink()
        (root / "cat").rmdir()
    else:
        (root / "stray.jpg").write_bytes(b"x")
    out = run_module("tinyvit158.evaluate", "--data", root, "--weights", weights)
    assert out.returncode == 1 and match in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    with pytest.raises(FolderError):
        load_labelled_folder(root, CFG)


def test_predict_streams_with_flat_memory(tmp_path, weights):
    """predict over 2,000 files keeps its peak memory within 1.5x of 200 files' (one line an
    image, printed as its batch is done). Measured for the note: 200 -> 20,000 files 1.05x."""
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    tiles = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    for n in (200, 2000):
        (tmp_path / str(n)).mkdir()
        for i in range(n):
            tiles[i % 20].save(tmp_path / str(n) / f"{i:05d}.png")
    code = ("import resource, sys; from tinyvit158.predict import main; sys.stdout = open('/dev/null', 'w'); "
            "rc = main([sys.argv[1], '--json', '--weights', sys.argv[2]]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")  # fmt: skip
    peaks = {}
    for n in (200, 2000):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / str(n)), str(weights)], capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr
        peaks[n] = int(out.stderr.strip().splitlines()[-1])
    assert peaks[2000] < 1.5 * peaks[200], peaks


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for this module's Ray tests (the CLI reuses it)."""
    pytest.importorskip("ray.data", reason="ray is not installed (pip install -e '.[cluster]'): Ray mode untested")
    from tinyvit158.cluster import connect

    ray, started = connect(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def test_evaluate_local_worker_pool_and_ray_agree(folder, weights, local_ray, capsys):
    """The same accuracy and per-image predictions whether the images are decoded here, in
    worker processes, or by Ray Data tasks for two engine actors (``--ray``)."""
    from tinyvit158.evaluate import main as evaluate

    results = []
    for extra in ([], ["--workers", "2"], ["--ray", "--actors", "2"]):
        assert evaluate(["--data", str(folder), "--weights", str(weights), "--json", "--batch", "5", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    local, pool, ray = results
    assert local["images"] == 12
    for other in (pool, ray):
        assert other["accuracy"] == local["accuracy"] and other["confusion"] == local["confusion"]
        assert other["predictions"] == local["predictions"]


def test_predict_on_ray_matches_the_local_run(tmp_path, folder, weights, local_ray, capsys):
    """File order, probabilities and the error record of an unreadable file, as locally."""
    from tinyvit158.predict import main as predict

    files = [str(p) for p in sorted(folder.glob("*/*"))]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    files.insert(3, str(tmp_path / "broken.png"))
    outs = []
    for extra in ([], ["--ray"]):
        assert predict([*files, "--json", "--weights", str(weights), "--batch", "4", *extra]) == 1  # the broken file
        outs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 13 and "error" in outs[0][3]


def test_ray_refusals_are_one_line(folder, weights, local_ray, capsys):
    from tinyvit158.evaluate import main as evaluate

    assert evaluate(["--data", str(folder), "--weights", str(weights), "--ray", "--actors", "3"]) == 1
    err = capsys.readouterr().err
    assert "error: --actors 3: the Ray cluster has 2 CPUs" in err  # one line (after the progress bar's)
    assert err.count("error") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        evaluate(["--data", str(folder), "--ray", "--engine", "oracle"])
    assert e.value.code == 2


def test_image_names_are_computed_once(folder):
    """evaluate looks names up once an image: a list built on every access made a 10,000-image
    folder take minutes (quadratic) after its images were classified."""
    data = load_labelled_folder(folder, CFG)
    assert data.names is data.names and data.names[-1] == "truck/3.jpg"
