"""No checkpoint the project reads can run code: every one loads with ``weights_only=True``
(PyTorch's restricted unpickler), and one that needs the full unpickler is refused in one
line, before anything in it is called (needs the train extra)."""

import os

import pytest

torch = pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")

from conftest import run_module  # noqa: E402
from fake_cifar import make_images, write_tarball  # noqa: E402

from tinyvit158.errors import TinyViTError  # noqa: E402
from tinyvit158.train.model import QATViT  # noqa: E402
from tinyvit158.train.state import load_checkpoint, load_run, resave_trusted, save_checkpoint  # noqa: E402
from tinyvit158.train.trainer import Recipe, train  # noqa: E402


class _Payload:
    """Unpickled by the full unpickler, this calls ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def evil(tmp_path):
    """A checkpoint-shaped pickle that would create ``marker`` when loaded unsafely."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "model": {}, "x": _Payload(f"touch {marker}")}, path)
    return path, marker


def _one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_the_payload_would_run_under_the_full_unpickler(evil):
    path, marker = evil  # the fixture is real: torch.load(weights_only=False) runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_code_before_running_it(evil):
    path, marker = evil
    with pytest.raises(TinyViTError, match=r"refused: .*full unpickler.*posix.system.*--resave-trusted"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, args",
    [
        ("tinyvit158.train.export", ["{evil}", "--out", "{tmp}/x.safetensors"]),
        ("tinyvit158.train.average", ["{evil}", "--out", "{tmp}/avg.pt"]),
        ("tinyvit158.evaluate", ["--data", "{data}", "--compare-torch", "{evil}", "--limit", "5"]),
        ("tinyvit158.train", ["--data", "{data}", "--out", "{tmp}/run", "--init", "{evil}", "--epochs", "1"]),
    ],
    ids=["export", "average", "evaluate", "train-init"],
)
def test_commands_refuse_a_malicious_checkpoint(evil, tmp_path, module, args):
    path, marker = evil
    data = write_tarball(tmp_path / "cifar-10-python.tar.gz", make_images(2, 0), make_images(1, 1))
    argv = [a.format(evil=path, tmp=tmp_path, data=data) for a in args]
    line = _one_line_error(run_module(module, *argv))
    assert "refused" in line and "full unpickler" in line
    assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "avg.pt").exists()


def test_resume_refuses_a_malicious_last_checkpoint(evil, tmp_path):
    path, marker = evil
    run = tmp_path / "run"
    run.mkdir()
    os.replace(path, run / "last.pt")
    data = write_tarball(tmp_path / "cifar-10-python.tar.gz", make_images(2, 0), make_images(1, 1))
    with pytest.raises(TinyViTError, match="refused"):
        train(Recipe(epochs=1), str(data), run, progress=False)
    assert not marker.exists()


def test_own_checkpoints_are_plain_and_an_old_one_is_resaved_only_when_trusted(tmp_path):
    model = QATViT(Recipe(config_overrides='{"depth": 1, "dim": 32, "heads": 2}').config())
    old = {"config": model.cfg.to_dict(), "model": model.state_dict(), "torch": torch.__version__, "epoch": 1}
    torch.save(old, tmp_path / "old.pt")  # as the trainer saved them before: torch.__version__ is no plain str
    with pytest.raises(TinyViTError, match="TorchVersion"):
        load_checkpoint(tmp_path / "old.pt")
    resave_trusted(tmp_path / "old.pt", tmp_path / "new.pt")
    loaded, state = load_run(tmp_path / "new.pt")
    assert type(state["torch"]) is str and state["torch"] == str(torch.__version__)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    save_checkpoint({"a": (1, 2.0, "x"), "b": None}, tmp_path / "p.pt")
    assert torch.load(tmp_path / "p.pt", weights_only=True) == {"a": [1, 2.0, "x"], "b": None}
    with pytest.raises(TinyViTError, match="cannot store a set"):
        save_checkpoint({"a": {1}}, tmp_path / "q.pt")
    assert not (tmp_path / "q.pt").exists() and not list(tmp_path.glob(".q.pt*"))


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04broken"], ids=["empty", "text", "truncated"])
def test_unreadable_checkpoints_fail_in_one_line(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(TinyViTError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(TinyViTError, match="not a readable"):
        load_checkpoint(tmp_path / "missing.pt")
