"""Bad input on every command: one line on stderr, the right exit status (1 bad input,
2 usage), no traceback, no hang, and never a command writing over its own input.

Most cases call the command's ``main`` in this process (fast); the hangs, the encodings
and signals run in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_module
from PIL import Image

from tinyvit158 import get_preset
from tinyvit158.errors import TinyViTError

EXAMPLES = ROOT / "examples"
CFG1 = get_preset("cifar10-tiny").replace(depth=1)


def run_main(capsys, main, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command's ``main`` run here; usage errors and
    ``--help`` are SystemExit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def outcome(capsys, main, argv) -> tuple[int, str]:
    """(exit status, stderr) of :func:`run_main`."""
    rc, _, err = run_main(capsys, main, argv)
    return rc, err


def assert_one_line(rc: int, err: str, code: int, match: str) -> None:
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    else:  # argparse: the usage, then one error line
        assert lines[-1].startswith(("usage:", "python -m", "tinyvit158")), err
    assert match in lines[-1], err


def free_port() -> int:
    """A loopback port where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    """A timm-named float ViT (depth 1) as safetensors."""
    from test_convert import save_safetensors, timm_state_dict

    return save_safetensors(tmp_path_factory.mktemp("float") / "float.safetensors", timm_state_dict(CFG1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trainer checkpoints of one architecture: with their ``epoch``, and without it (as
    old runs and other tools write them)."""
    pytest.importorskip("torch", reason="the train extra is not installed")
    from tinyvit158.train.model import QATViT
    from tinyvit158.train.state import save_checkpoint

    d = tmp_path_factory.mktemp("runs")
    model = QATViT(CFG1).state_dict()
    save_checkpoint({"config": CFG1.to_dict(), "model": model, "epoch": 3}, d / "a.pt")
    save_checkpoint({"config": CFG1.to_dict(), "model": model}, d / "b.pt")
    return d / "a.pt", d / "b.pt"


# -- hangs ---------------------------------------------------------------------------------


def test_predict_on_a_fifo_says_so_and_does_not_block(fifo, weights):
    out = run_module("tinyvit158.predict", fifo, "--weights", weights, timeout=120)
    assert_one_line(out.returncode, out.stderr, 1, "is a FIFO (named pipe), not a regular file")


@pytest.mark.parametrize("module", ["tinyvit158.weights", "tinyvit158.convert", "tinyvit158.evaluate"])
def test_other_commands_do_not_block_on_a_fifo(fifo, tmp_path, module):
    args = {"tinyvit158.weights": [fifo], "tinyvit158.convert": [fifo, "--out", tmp_path / "o.safetensors"],
            "tinyvit158.evaluate": ["--weights", fifo, "--data", tmp_path]}[module]  # fmt: skip
    out = run_module(module, *args, timeout=120)
    assert_one_line(out.returncode, out.stderr, 1, "FIFO")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_address_where_no_ray_cluster_listens_is_one_line_at_once(command, tmp_path, weights):
    pytest.importorskip("ray.data", reason="ray is not installed (pip install -e '.[cluster]')")
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "cat" / "a.png")
    target = ["--data", tmp_path] if command == "evaluate" else [tmp_path / "cat"]
    t0 = time.monotonic()
    out = run_module(f"tinyvit158.{command}", *target, "--weights", weights, "--ray", f"127.0.0.1:{free_port()}",
                     timeout=120)  # fmt: skip
    assert_one_line(out.returncode, out.stderr, 1, "could not reach the Ray cluster at 127.0.0.1:")
    assert time.monotonic() - t0 < 60


def test_a_cluster_that_never_answers_is_given_up_after_ray_timeout(tmp_path, weights):
    """Something listens but Ray's connection never completes: the watchdog ends the run.
    A stand-in ``ray`` whose ``init`` never returns plays the stuck cluster."""
    fake = tmp_path / "fake"
    (fake / "ray" / "data").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("import time\ndef is_initialized():\n    return False\n"
                                              "def init(**kwargs):\n    time.sleep(3600)\n")  # fmt: skip
    (fake / "ray" / "data" / "__init__.py").write_text("")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"}
        cmd = [sys.executable, "-m", "tinyvit158.predict", EXAMPLES / "cat.jpg", "--weights", weights,
               "--ray", f"127.0.0.1:{port}", "--ray-timeout", "2"]  # fmt: skip
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert_one_line(out.returncode, out.stderr, 1, "within 2 s")
    assert time.monotonic() - t0 < 60


def test_ray_timeout_must_be_positive(capsys):
    from tinyvit158.predict import main

    assert_one_line(*outcome(capsys, main, [EXAMPLES, "--ray", "--ray-timeout", "0"]), 2, "positive number")


def test_a_ray_client_address_without_ray_client_says_what_to_install(monkeypatch):
    pytest.importorskip("ray.data", reason="ray is not installed (pip install -e '.[cluster]')")
    from tinyvit158.cluster import connect

    monkeypatch.setitem(sys.modules, "grpc", None)  # as if ray[client] were not installed
    with pytest.raises(TinyViTError, match=r"pip install 'ray\[client\]'"):
        connect("ray://127.0.0.1:1")


def test_the_cluster_extra_installs_ray_client():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'cluster = ["ray[data,client]' in text


# -- no command writes over its own input ---------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link"])
@pytest.mark.parametrize("kind", ["weight file", "float model"])
def test_convert_never_writes_over_its_source(tmp_path, weights, float_model, capsys, how, kind):
    from tinyvit158.convert import main

    src = tmp_path / "src.safetensors"
    src.write_bytes(Path(weights if kind == "weight file" else float_model).read_bytes())
    before = src.read_bytes()
    out = {"same path": src, "symbolic link": tmp_path / "sym.safetensors", "hard link": tmp_path / "hard.safetensors"}
    if how == "symbolic link":
        out[how].symlink_to(src.name)
    elif how == "hard link":
        os.link(src, out[how])
    args = [src, "--out", out[how]] + (["--set", "attention=int8"] if kind == "weight file" else ["--set", "heads=3"])
    assert_one_line(*outcome(capsys, main, args), 1, "writing it would destroy the input")
    assert src.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["export", "average", "checkpoint"])
def test_train_tools_never_write_over_their_input(runs, capsys, command):
    from tinyvit158.train import average, checkpoint, export

    a, b = runs
    before = a.read_bytes()
    main, args = {"export": (export.main, [a, "--out", a]), "average": (average.main, [b, a, "--out", a]),
                  "checkpoint": (checkpoint.main, [a, "--resave-trusted", a])}[command]  # fmt: skip
    assert_one_line(*outcome(capsys, main, args), 1, "writing it would destroy the input")
    assert a.read_bytes() == before


def test_training_from_a_run_into_the_same_folder_is_refused(runs, tmp_path, capsys):
    from tinyvit158.train import trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(runs[0].read_bytes())
    rc, err = outcome(capsys, trainer.main, ["--data", tmp_path, "--init", run / "best.pt", "--out", run,
                                             "--epochs", "1"])  # fmt: skip
    assert_one_line(rc, err, 1, "an input of this run that it would write over")


# -- outputs that cannot be written ---------------------------------------------------------


def _command(name):
    from tinyvit158 import convert
    from tinyvit158.train import average, export

    return {"convert": convert.main, "export": export.main, "average": average.main}[name]


@pytest.mark.parametrize("where", ["a directory", "under a file"])
@pytest.mark.parametrize("command", ["convert", "export", "average"])
def test_an_output_that_cannot_be_a_file_is_one_line(tmp_path, weights, runs, capsys, command, where):
    if where == "a directory":
        out, match = tmp_path / "folder", "is a directory"
        out.mkdir()
    else:
        (tmp_path / "afile").write_text("x")
        out, match = tmp_path / "afile" / "out.safetensors", "afile is a file, not a folder"
    src = {"convert": [weights, "--set", "attention=int8"], "export": [runs[0]], "average": list(runs)}[command]
    assert_one_line(*outcome(capsys, _command(command), [*src, "--out", out]), 1, match)


# -- tracebacks that are now one line -------------------------------------------------------


def test_an_unknown_config_field_on_a_float_model_is_one_line(tmp_path, float_model, capsys):
    from tinyvit158.convert import main

    args = [float_model, "--out", tmp_path / "o.safetensors", "--set", "heads=3", "--set", "colour=red"]
    assert_one_line(*outcome(capsys, main, args), 1, "unknown config keys ['colour']")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_calibration_images_below_one_is_a_usage_error_before_any_loading(tmp_path, float_model, capsys, n):
    from tinyvit158.convert import main

    args = [float_model, "--out", tmp_path / "o.safetensors", "--compensate", "--calib", tmp_path / "nowhere",
            "--calib-images", n]  # fmt: skip
    assert_one_line(*outcome(capsys, main, args), 2, "--calib-images must be at least 1")


def test_average_of_checkpoints_without_an_epoch(runs, tmp_path, capsys):
    from tinyvit158.train.average import main
    from tinyvit158.train.state import load_checkpoint

    rc, err = outcome(capsys, main, [runs[1], runs[1], "--out", tmp_path / "avg.pt"])
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "avg.pt")["averaged"] == ["b.pt (epoch ?)", "b.pt (epoch ?)"]


@pytest.mark.parametrize("content", [None, b""], ids=["missing", "empty"])
def test_resave_trusted_of_a_missing_or_empty_file_is_one_line(tmp_path, capsys, content):
    pytest.importorskip("torch", reason="the train extra is not installed")
    from tinyvit158.train.checkpoint import main

    if content is not None:
        (tmp_path / "old.pt").write_bytes(content)
    rc, err = outcome(capsys, main, [tmp_path / "old.pt", "--resave-trusted", tmp_path / "new.pt"])
    assert_one_line(rc, err, 1, "no such file" if content is None else "is an empty file")
    assert not (tmp_path / "new.pt").exists()


def test_a_file_name_that_is_not_utf8_prints_escaped(tmp_path, weights):
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name
    (folder / name).write_bytes((EXAMPLES / "cat.jpg").read_bytes())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-m", "tinyvit158.predict", folder, "--weights", weights], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "caf\\xe9.jpg" in out.stdout


# -- wrong answers and exit statuses --------------------------------------------------------


@pytest.mark.parametrize("n", ["0", "-1"])
def test_evaluate_refuses_fewer_than_one_worker(tmp_path, capsys, n):
    from tinyvit158.evaluate import main

    assert_one_line(*outcome(capsys, main, ["--data", tmp_path, "--workers", n]), 2, "--workers must be at least 1")


def test_a_weight_file_is_not_a_training_checkpoint(weights, capsys):
    pytest.importorskip("torch", reason="the train extra is not installed")
    from tinyvit158.train.checkpoint import main

    assert_one_line(*outcome(capsys, main, [weights]), 1, "a safetensors weight file, not a training checkpoint")


@pytest.mark.parametrize("bad", ["missing", "float model"])
def test_bench_with_a_bad_weight_file_exits_1_at_once(tmp_path, float_model, capsys, bad):
    from tinyvit158.bench import main

    path = tmp_path / "missing.safetensors" if bad == "missing" else float_model
    match = "no such weight file" if bad == "missing" else "metadata format is None"
    assert_one_line(*outcome(capsys, main, ["--weights", path, "--variants", "engine"]), 1, match)


def test_weights_help_prints_the_help(capsys):
    from tinyvit158.weights import main

    rc, out, err = run_main(capsys, main, ["--help"])
    assert rc == 0 and err == "" and out.startswith("usage: python -m tinyvit158.weights [-h] [FILE]")


@pytest.mark.parametrize("name", ["folder", "model.safetensors"])
def test_convert_of_a_directory_says_it_is_one(tmp_path, capsys, name):
    from tinyvit158.convert import main

    (tmp_path / name).mkdir()
    rc, err = outcome(capsys, main, [tmp_path / name, "--out", tmp_path / "o.safetensors"])
    assert_one_line(rc, err, 1, "is a directory, not a file")


# -- worth fixing on the way ----------------------------------------------------------------


def test_no_temporary_file_is_left_on_an_error_and_stale_ones_are_reported(tmp_path, weights, capsys, monkeypatch):
    from tinyvit158.convert import main

    out = tmp_path / "o.safetensors"

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    assert_one_line(*outcome(capsys, main, [weights, "--out", out]), 1, "No space left on device")
    assert not out.exists() and not list(tmp_path.glob(".*"))
    monkeypatch.undo()
    (tmp_path / ".o.safetensors.abcd1234.tmp").write_bytes(b"x" * 10)  # as a SIGKILL leaves it
    rc, err = outcome(capsys, main, [weights, "--out", out])
    assert rc == 0 and "1 temporary file(s) beside" in err and ".o.safetensors.abcd1234.tmp" in err


def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from tinyvit158.files import atomic_path
        with atomic_path({str(tmp_path / "out.bin")!r}) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            import time; time.sleep(30)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_workers_are_clamped_to_the_cpus(capsys):
    from tinyvit158.pipeline import usable_workers

    cpus = len(os.sched_getaffinity(0))
    assert usable_workers(1000) == cpus and f"using {cpus}" in capsys.readouterr().err
    assert usable_workers(1) == 1 and capsys.readouterr().err == ""


@pytest.fixture
def messy_folder(tmp_path):
    """A labelled folder with what real ones hold: hidden files and folders, and a bad file."""
    root = tmp_path / "data"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 40 * i + (c == "cat") * 100, np.uint8)).save(root / c / f"{i}.png")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "cat" / "._0.png").write_bytes(b"\0\5\26\7")  # a macOS resource fork
    (root / "dog" / "notes.jpg").write_text("not an image\n")
    return root


def test_evaluate_skips_hidden_entries_and_counts_bad_files(messy_folder, weights, capsys):
    from tinyvit158.evaluate import main

    rc, out, err = run_main(capsys, main, ["--data", messy_folder, "--weights", weights, "--json"])
    assert rc == 0 and "Traceback" not in err, err
    report = json.loads(out)
    assert report["images"] == 4 and [s["image"] for s in report["skipped"]] == ["dog/notes.jpg"]
    assert "not an image Pillow can read" in report["skipped"][0]["error"]
    assert [line for line in err.splitlines() if "skipped" in line] == [f"skipped: {report['skipped'][0]['error']}"]
    rc, err = outcome(capsys, main, ["--data", messy_folder, "--weights", weights, "--strict"])
    assert_one_line(rc, err, 1, "notes.jpg: not an image Pillow can read (--strict)")


def test_an_image_over_the_decoded_pixel_cap_is_refused_before_decoding(tmp_path):
    from test_predict import png_header

    from tinyvit158.errors import ImageError
    from tinyvit158.image import MAX_DECODED_PIXELS, load_image

    (tmp_path / "huge.png").write_bytes(png_header(8000, 6000))  # 48 MP, under Pillow's bomb guard
    assert 8000 * 6000 > MAX_DECODED_PIXELS
    with pytest.raises(ImageError, match="over the 40 MP that an image may take"):
        load_image(tmp_path / "huge.png", get_preset("cifar10-tiny"))
