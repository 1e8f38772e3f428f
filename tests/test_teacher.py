"""The convolutional teacher and distillation from it (needs the train extra)."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")


from tinyvit158.errors import TinyViTError  # noqa: E402
from tinyvit158.train import teacher as T  # noqa: E402
from tinyvit158.train.trainer import Recipe, distill_loss, load_teacher, train  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "cifar10-tiny.safetensors"
SMALL = T.TeacherRecipe(widths=[8, 16, 16], epochs=6, batch=25, lr=50.0, holdout=20, ema_start=1, ema_every=2)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # deterministic CPU kernels


@pytest.fixture(scope="module")
def tarball(cifar_tarball):
    return cifar_tarball


@pytest.fixture(scope="module")
def teacher_run(tarball, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        record = T.train_teacher(SMALL, str(tarball), out, progress=False)
    return out, record


def test_whitening_layer_whitens_the_patches_it_was_fitted_on():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g)  # correlated 2x2x3 patches
    x = (torch.randn(400, 12, generator=g) @ mix).reshape(400, 3, 2, 2)
    model = T.ConvTeacher([8, 8, 8])
    model.init_whitening(x, eps=0.0)
    out = torch.nn.functional.conv2d(x, model.whiten.weight).reshape(400, -1)[:, :12].double()
    cov = out.T @ out / len(out)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])  # the negatives too


def test_teacher_trains_saves_safely_and_records_its_accuracy(teacher_run):
    out, record = teacher_run
    state = torch.load(out / "teacher.pt", weights_only=True)  # plain values and tensors only
    assert state["kind"] == T.KIND and state["widths"] == [8, 16, 16]
    assert 0 <= record["val_acc"] <= 1 and 0 <= record["test_acc"] <= 1  # the tarball has a test split
    # colour blobs: a few epochs beat chance (0.1) by far on held-out images (the fake test
    # split draws other colours, so only its range is checked)
    assert record["val_acc"] >= 0.4
    meta = json.loads((out / "teacher.json").read_text())
    assert [e["epoch"] for e in meta["log"]] == [1, 2, 3, 4, 5, 6] and "model" not in meta


def test_teacher_resumes_exactly(tarball, tmp_path, teacher_run):
    out, _ = teacher_run
    stopped = T.train_teacher(SMALL, str(tarball), tmp_path, progress=False, max_minutes=1e-9)
    assert stopped == {"stopped_after": 1} and not (tmp_path / "teacher.pt").exists()
    T.train_teacher(SMALL, str(tarball), tmp_path, progress=False)
    a = torch.load(out / "teacher.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "teacher.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TinyViTError, match="different recipe"):
        T.train_teacher(T.TeacherRecipe(**{**SMALL.__dict__, "lr": 1.0}), str(tarball), tmp_path, progress=False)


def test_evaluate_teacher_agrees_with_the_training_record(teacher_run, tarball, capsys):
    out, record = teacher_run
    assert T.evaluate_teacher(str(out / "teacher.pt"), str(tarball))["test_acc_tta"] == pytest.approx(
        record["test_acc"]
    )
    assert T.main(["--data", str(tarball), "--evaluate", str(out / "nope.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_hard_distillation_loss():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    targets = torch.softmax(torch.randn(6, 10, generator=g), dim=1)
    ce = torch.sum(-targets * torch.log_softmax(logits, 1), 1).mean()
    onehot = torch.nn.functional.one_hot(teacher.argmax(1), 10).float() * 0.9 + 0.01
    hard = torch.sum(-onehot * torch.log_softmax(logits, 1), 1).mean()
    got = distill_loss(logits, targets, teacher, 0.5, 4.0, hard=True, smoothing=0.1)
    assert torch.allclose(got, 0.5 * ce + 0.5 * hard, atol=1e-6)


def test_a_conv_teacher_teaches_the_vit(teacher_run, tarball, tmp_path):
    out, _ = teacher_run
    base = dict(config_overrides='{"depth": 1, "dim": 32, "heads": 2}', epochs=1, batch=20, holdout=20, seed=1)
    teacher = load_teacher(str(out / "teacher.pt"), Recipe(**base).config(), "cpu")
    assert isinstance(teacher, T.ConvTeacher) and not teacher.training
    plain = train(Recipe(**base), str(tarball), tmp_path / "plain", progress=False)
    taught = Recipe(**base, teacher=str(out / "teacher.pt"), distill=0.5, distill_hard=True)
    hard = train(taught, str(tarball), tmp_path / "hard", progress=False)
    assert hard["train_loss"] != plain["train_loss"]
    with pytest.raises(TinyViTError, match="need one ViT teacher"):
        train(Recipe(**{**taught.__dict__, "attn_distill": 1.0}), str(tarball), tmp_path / "attn", progress=False)
    other = Recipe(**{**base, "config_overrides": '{"depth": 1, "dim": 32, "heads": 2, "mean": [0.5, 0.5, 0.5]}'})
    with pytest.raises(TinyViTError, match="other inputs"):
        load_teacher(str(out / "teacher.pt"), other.config(), "cpu")


def test_an_ensemble_teacher_averages_its_members_logits(teacher_run, tarball, tmp_path):
    out, _ = teacher_run
    base = dict(config_overrides='{"depth": 1, "dim": 32, "heads": 2}', epochs=1, batch=20, holdout=20, seed=1)
    cfg = Recipe(**base).config()
    paths = [str(out / "teacher.pt"), str(SHIPPED)]
    ensemble = load_teacher(",".join(paths), cfg, "cpu")
    assert not ensemble.training
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        members = [load_teacher(p, cfg, "cpu")(x) for p in paths]
        got = ensemble(x)
    assert not torch.allclose(members[0], members[1], atol=1e-2)
    assert torch.allclose(got, (members[0] + members[1]) / 2, atol=1e-5)
    taught = Recipe(**base, teacher=",".join(paths), distill=0.5, distill_hard=True, feature_distill=1.0)
    with pytest.raises(TinyViTError, match="need one ViT teacher"):
        train(taught, str(tarball), tmp_path / "feat", progress=False)


def test_the_held_out_split_follows_split_seed_not_seed(tarball, tmp_path, monkeypatch):
    seeds = []
    real = T.split_holdout

    def spy(labels, holdout, seed):
        seeds.append(seed)
        return real(labels, holdout, seed)

    monkeypatch.setattr(T, "split_holdout", spy)
    member = T.TeacherRecipe(**{**SMALL.__dict__, "seed": 3, "split_seed": 0})
    T.train_teacher(member, str(tarball), tmp_path, progress=False, max_minutes=1e-9)
    assert seeds == [0]  # an ensemble member (seed 3) keeps the student's held-out images unseen
