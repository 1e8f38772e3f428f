"""The trainer and exporter, on a tiny model and a tiny CIFAR look-alike (needs the train extra)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")

from fake_cifar import make_images  # noqa: E402

from tinyvit158.engine import Engine  # noqa: E402
from tinyvit158.errors import TinyViTError  # noqa: E402
from tinyvit158.train.export import to_checkpoint, torch_logits  # noqa: E402
from tinyvit158.train.model import QATViT  # noqa: E402
from tinyvit158.train.state import load_run  # noqa: E402
from tinyvit158.train.trainer import Recipe, train  # noqa: E402
from tinyvit158.weights import load_weights, save_weights  # noqa: E402

RECIPE = Recipe(
    config_overrides='{"depth": 1, "dim": 32, "heads": 2}', epochs=3, batch=20, lr=3e-3, warmup_epochs=1,
    holdout=20, seed=1, drop_path=0.1,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # deterministic CPU kernels


@pytest.fixture(scope="module")
def tarball(cifar_tarball):
    return cifar_tarball


def test_resumed_run_equals_uninterrupted_run(tmp_path, tarball):
    whole = train(RECIPE, str(tarball), tmp_path / "whole", progress=False)
    # interrupted: the first call stops after one epoch (any positive limit is reached at once)
    train(RECIPE, str(tarball), tmp_path / "split", max_minutes=1e-9, progress=False)
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train(RECIPE, str(tarball), tmp_path / "split", progress=False)
    assert resumed["epoch"] == whole["epoch"] == 3
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len((tmp_path / "split" / "log.jsonl").read_text().splitlines()) == 3


def test_augmenting_in_worker_processes_changes_nothing(tmp_path, tarball):
    one = Recipe(**{**RECIPE.__dict__, "epochs": 1})
    train(one, str(tarball), tmp_path / "main", progress=False)
    train(one, str(tarball), tmp_path / "workers", progress=False, workers=2)
    a = torch.load(tmp_path / "main" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "workers" / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_changed_recipe(tmp_path, tarball):
    train(RECIPE, str(tarball), tmp_path / "r", max_minutes=1e-9, progress=False)
    changed = Recipe(**{**RECIPE.__dict__, "lr": 1e-4})
    with pytest.raises(TinyViTError, match="different recipe"):
        train(changed, str(tarball), tmp_path / "r", progress=False)


def test_export_matches_the_torch_model(tmp_path, tarball):
    train(RECIPE, str(tarball), tmp_path / "run", progress=False)
    model, state = load_run(tmp_path / "run" / "last.pt")
    ckpt, differing = to_checkpoint(model, {"recipe": "test"})
    assert differing == 0
    save_weights(tmp_path / "w.safetensors", ckpt)
    loaded = load_weights(tmp_path / "w.safetensors")
    images, _ = make_images(4, 7)
    ours = torch_logits(model, images)
    twin = torch_logits(QATViT.from_checkpoint(loaded), images)
    np.testing.assert_array_equal(twin, ours)  # the checkpoint and its file: one function, bit for bit
    from tinyvit158.image import normalize

    engine_logits = Engine(loaded)(np.stack([normalize(im, loaded.config) for im in images]))
    scale = np.abs(ours).max()
    diff = np.abs(engine_logits - ours)
    # the same arithmetic; only a float ulp at an int8 rounding tie could flip a code
    assert np.median(diff) < 1e-5 * scale and diff.max() < 0.05 * scale
    margin = np.diff(np.sort(ours, axis=1)[:, -2:], axis=1)[:, 0]
    clear = margin > 0.05 * scale
    assert np.array_equal(engine_logits.argmax(1)[clear], ours.argmax(1)[clear])


def test_distill_loss():
    from tinyvit158.train.trainer import distill_loss

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    targets = torch.softmax(torch.randn(6, 10, generator=g), dim=1)
    ce = torch.sum(-targets * torch.log_softmax(logits, 1), 1).mean()
    assert torch.allclose(distill_loss(logits, targets, teacher, 0.0, 4.0), ce)
    assert torch.allclose(distill_loss(logits, targets, None, 0.7, 4.0), ce)
    # a student that already matches its teacher pays only the hard term
    assert torch.allclose(distill_loss(logits, targets, logits.clone(), 0.7, 4.0), 0.3 * ce, atol=1e-6)
    assert distill_loss(logits, targets, teacher, 1.0, 4.0) > 0


def test_distilled_run_resumes_exactly(tmp_path, tarball):
    """A float teacher (all epochs float) teaches a ternary student; the distilled run is
    resumable like any other, and the teacher changes what the student learns."""
    teacher = Recipe(**{**RECIPE.__dict__, "epochs": 1, "float_epochs": 1})
    train(teacher, str(tarball), tmp_path / "teacher", progress=False)
    student = Recipe(**{**RECIPE.__dict__, "teacher": str(tmp_path / "teacher" / "last.pt"), "distill": 0.5})
    whole = train(student, str(tarball), tmp_path / "whole", progress=False)
    train(student, str(tarball), tmp_path / "split", max_minutes=1e-9, progress=False)
    resumed = train(student, str(tarball), tmp_path / "split", progress=False)
    keys = ("epoch", "train_loss", "val_acc")
    assert [resumed[k] for k in keys] == [whole[k] for k in keys] and whole["epoch"] == 3
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = train(RECIPE, str(tarball), tmp_path / "plain", progress=False)
    assert plain["train_loss"] != whole["train_loss"]
    with pytest.raises(TinyViTError, match="need --teacher"):
        train(Recipe(**{**RECIPE.__dict__, "distill": 0.5}), str(tarball), tmp_path / "none", progress=False)


def test_bfloat16_products_round_only_the_output():
    """``--matmul bfloat16`` multiplies the codes themselves (exact in bfloat16), so the
    forward pass differs from float32 only by rounding each sum to bfloat16 (8 bits), and
    the gradients stay close to float32's."""
    from tinyvit158.config import get_preset
    from tinyvit158.train.model import BitLinear, quantize_activations, ternarize_weight

    cfg = get_preset("cifar10-tiny")
    torch.manual_seed(0)
    layer = BitLinear(96, 40, True, cfg)
    x = torch.randn(3, 17, 96)
    outs, grads = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        layer.matmul_dtype = dtype
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(xi)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        outs[dtype], grads[dtype] = y.detach(), (xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    x_q, s_x = quantize_activations(x)
    w_q, gamma = ternarize_weight(layer.weight.detach(), "tensor")
    acc = torch.einsum("btk,ok->bto", x_q.double(), w_q.double())  # exact integer sums
    exact = acc * s_x.double() * gamma.double().reshape(-1) + layer.bias.detach().double()
    unit = s_x.double() * gamma.double().reshape(-1)  # one step of the sum
    scale = (acc.abs() + 1) * unit + layer.bias.detach().double().abs()
    assert ((outs[torch.bfloat16].double() - exact).abs() / scale).max() <= 2.0**-8  # one bfloat16 rounding
    assert ((outs[torch.float32].double() - exact).abs() / scale).max() < 1e-5
    for a, b in zip(grads[torch.float32], grads[torch.bfloat16], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=2e-2 * a.abs().max())
    layer.eval()
    with torch.no_grad():  # inference is the engine's arithmetic whatever the training dtype
        assert torch.equal(layer(x), (x_q @ w_q.T) * s_x * gamma.reshape(-1) + layer.bias)


def test_bfloat16_run_and_fine_tuning_from_a_run(tmp_path, tarball):
    from tinyvit158.train.trainer import init_from

    one = Recipe(**{**RECIPE.__dict__, "epochs": 1, "matmul": "bfloat16"})
    first = train(one, str(tarball), tmp_path / "a", progress=False)
    assert np.isfinite(first["train_loss"])
    model = QATViT(one.config())
    init_from(model, str(tmp_path / "a" / "last.pt"), "cpu")
    saved = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    tuned = Recipe(**{**one.__dict__, "init": str(tmp_path / "a" / "last.pt")})
    assert train(tuned, str(tarball), tmp_path / "b", progress=False)["train_loss"] != first["train_loss"]
    from tinyvit158.train import export

    assert export.main([str(tmp_path / "b" / "last.pt"), "--out", str(tmp_path / "b.safetensors")]) == 0
    source = load_weights(tmp_path / "b.safetensors").source
    (parent,) = source["fine_tuned_from"]  # where it started
    assert parent["checkpoint"] == "a/last.pt" and parent["epoch"] == 1 and parent["recipe"] == one.__dict__
    assert source["recipe"] == {**tuned.__dict__, "init": "a/last.pt"}  # no machine's absolute path
    with pytest.raises(TinyViTError, match="--init"):
        init_from(QATViT(one.config().replace(dim=48)), str(tmp_path / "a" / "last.pt"), "cpu")
    with pytest.raises(TinyViTError, match="--matmul"):
        train(Recipe(**{**one.__dict__, "matmul": "int4"}), str(tarball), tmp_path / "c", progress=False)


def test_snapshots_average_and_export(tmp_path, tarball, capsys):
    from tinyvit158.train import average, export

    train(RECIPE, str(tarball), tmp_path / "run", progress=False, snapshots=2)
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch-*.pt")) == ["epoch-002.pt", "epoch-003.pt"]
    snaps = [str(tmp_path / "run" / f"epoch-00{e}.pt") for e in (2, 3)]
    assert average.main([*snaps, "--out", str(tmp_path / "avg.pt"), "--data", str(tarball)]) == 0
    printed = capsys.readouterr().out
    assert "epoch-002.pt: held-out accuracy" in printed and "average of 2: held-out accuracy" in printed
    avg = torch.load(tmp_path / "avg.pt", weights_only=True)
    a, b = (torch.load(p, weights_only=True)["model"] for p in snaps)
    for k in a:
        assert torch.allclose(avg["model"][k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7), k
    assert avg["epoch"] == 3 and avg["averaged"] == ["epoch-002.pt (epoch 2)", "epoch-003.pt (epoch 3)"]
    assert export.main([str(tmp_path / "avg.pt"), "--out", str(tmp_path / "avg.safetensors"), "--name", "avg"]) == 0
    assert load_weights(tmp_path / "avg.safetensors").config.name == "avg"
    source = load_weights(tmp_path / "avg.safetensors").source
    assert source["averaged"] == avg["averaged"] and source["val_acc"] == avg["log"]["val_acc"]
    other = Recipe(**{**RECIPE.__dict__, "epochs": 1, "config_overrides": '{"depth": 1, "dim": 16, "heads": 2}'})
    train(other, str(tarball), tmp_path / "other", progress=False)
    assert average.main([snaps[0], str(tmp_path / "other" / "last.pt"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "another architecture" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_fine_tuning_from_a_weight_file_into_int8_attention(tmp_path, tarball):
    """``--init FILE.safetensors``: the latent weights ternarize back to the file's codes and
    scales, so the run starts from the file's function; the run may switch the attention to
    int8 with qk norms (new tensors) and learn them, and a weight file can teach."""
    from tinyvit158.train.trainer import init_from

    train(RECIPE, str(tarball), tmp_path / "run", progress=False)
    model, _ = load_run(tmp_path / "run" / "last.pt")
    ckpt, _ = to_checkpoint(model, {})
    save_weights(tmp_path / "w.safetensors", ckpt)
    fresh = QATViT(RECIPE.config())
    init_from(fresh, str(tmp_path / "w.safetensors"), "cpu")
    again, differing = to_checkpoint(fresh.eval(), {})
    for layer in ckpt.config.linear_shapes():
        if ckpt.config.is_ternary(layer):
            assert np.array_equal(again.ternary(layer)[0], ckpt.ternary(layer)[0]), layer
            np.testing.assert_allclose(again.ternary(layer)[1], ckpt.ternary(layer)[1], rtol=1e-6)
    floats = QATViT(RECIPE.config())  # a float run from the file starts from codes x gamma
    init_from(floats, str(tmp_path / "w.safetensors"), "cpu", as_float=True)
    for layer in ckpt.config.linear_shapes():
        if ckpt.config.is_ternary(layer):
            codes, gamma, _ = ckpt.ternary(layer)
            got = floats.get_submodule(layer).weight.detach().double().numpy().reshape(codes.shape)
            np.testing.assert_allclose(got, codes * gamma.astype(np.float64)[:, None], rtol=1e-7)
            assert np.array_equal(got == 0, codes == 0), layer
    overrides = '{"attention": "int8", "attention_bits": 4, "attention_prob_bits": 4, "depth": 1, "dim": 32, ' \
        '"heads": 2, "qk_norm": true}'  # fmt: skip
    tuned = Recipe(**{**RECIPE.__dict__, "epochs": 1, "config_overrides": overrides,
                      "init": str(tmp_path / "w.safetensors"), "teacher": str(tmp_path / "w.safetensors"),
                      "distill": 0.5})  # fmt: skip
    assert np.isfinite(train(tuned, str(tarball), tmp_path / "int8", progress=False)["train_loss"])
    int8_model, state = load_run(tmp_path / "int8" / "last.pt")
    assert int8_model.cfg.attention == "int8" and int8_model.cfg.qk_norm
    assert not torch.equal(state["model"]["blocks.0.attn.q_norm.weight"], torch.ones(16))  # learned
    import hashlib

    from tinyvit158.train.export import lineage

    digest = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert lineage(state) == [{"weight_file": "w.safetensors", "sha256": digest, "source": {}}]
    exported, _ = to_checkpoint(int8_model, {})
    images, _ = make_images(2, 5)
    twin = torch_logits(QATViT.from_checkpoint(exported), images)
    np.testing.assert_array_equal(twin, torch_logits(int8_model, images))  # checkpoint and file: one function
    with pytest.raises(TinyViTError, match="other fields"):
        init_from(QATViT(RECIPE.config().replace(dim=48)), str(tmp_path / "w.safetensors"), "cpu")


def test_progressive_and_activation_first_recipes(tmp_path, tarball):
    """TerViT's progressive recipe (float, then int8 weights, then ternary), GPLQ's
    activation-first stage (int8 activations, float weights, feature mimicking of a float
    teacher) followed by post-training ternarization, and channel-wise scales end to end."""
    from tinyvit158.convert import main as convert
    from tinyvit158.train.trainer import stage_of

    r = Recipe(**{**RECIPE.__dict__, "epochs": 4, "float_epochs": 1, "int8_epochs": 2})
    assert [stage_of(e, r) for e in range(4)] == ["float", "int8", "int8", "ternary"]
    log = tmp_path / "tervit" / "log.jsonl"
    channel = RECIPE.config_overrides[:-1] + ', "scale_granularity": "channel"}'
    train(Recipe(**{**r.__dict__, "config_overrides": channel}), str(tarball), tmp_path / "tervit", progress=False)
    import json as _json

    assert [_json.loads(line)["stage"] for line in log.read_text().splitlines()] == ["float", "int8", "int8",
                                                                                      "ternary"]  # fmt: skip
    model, _ = load_run(tmp_path / "tervit" / "best.pt")
    assert model.cfg.scale_granularity == "channel"
    ckpt, differing = to_checkpoint(model, {})
    assert differing == 0 and len(set(ckpt.ternary("blocks.0.mlp.fc1")[1])) > 1  # a scale per channel
    images, _ = make_images(2, 3)
    np.testing.assert_array_equal(torch_logits(QATViT.from_checkpoint(ckpt), images), torch_logits(model, images))

    teacher = Recipe(**{**RECIPE.__dict__, "epochs": 1, "float_epochs": 1})
    train(teacher, str(tarball), tmp_path / "float", progress=False)
    float_run = str(tmp_path / "float" / "last.pt")
    gplq = Recipe(**{**RECIPE.__dict__, "epochs": 1, "act_only_epochs": 1, "teacher": float_run,
                     "feature_distill": 1.0, "init": float_run})  # fmt: skip
    record = train(gplq, str(tarball), tmp_path / "gplq", progress=False)
    assert record["stage"] == "act-only" and np.isfinite(record["train_loss"])
    # best.pt: the best epoch of the run's final stage (a float run's float epochs; here act-only)
    assert (tmp_path / "float" / "best.pt").exists() and (tmp_path / "gplq" / "best.pt").exists()
    out = tmp_path / "gplq.safetensors"
    assert convert([str(tmp_path / "gplq" / "last.pt"), "--out", str(out), "--granularity", "channel"]) == 0
    assert load_weights(out).config.scale_granularity == "channel"
    with pytest.raises(TinyViTError, match="need --teacher"):
        train(Recipe(**{**RECIPE.__dict__, "feature_distill": 1.0}), str(tarball), tmp_path / "x", progress=False)


def test_attention_map_distillation(tmp_path, tarball):
    """Q-ViT-style: the student's attention maps are pulled toward a float teacher's (KL per
    row); the term is zero for a student that is its own teacher, and changes training."""
    from tinyvit158.train.trainer import attention_kl

    cfg = RECIPE.config()
    model = QATViT(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.keep_attention(True)
        model(x)
        same = [list(m) for m in a]
        model.keep_attention(False)
    assert len(same) == cfg.depth and same[0][0].shape == (2, cfg.heads, cfg.num_tokens, cfg.num_tokens)
    assert float(attention_kl(same, same)) == pytest.approx(0.0, abs=1e-7)
    teacher = Recipe(**{**RECIPE.__dict__, "epochs": 1, "float_epochs": 1})
    train(teacher, str(tarball), tmp_path / "teacher", progress=False)
    int8 = '{"attention": "int8", "attention_bits": 4, "attention_prob_bits": 4, "depth": 1, "dim": 32, "heads": 2}'
    base = {**RECIPE.__dict__, "epochs": 1, "config_overrides": int8, "teacher": str(tmp_path / "teacher" / "last.pt")}
    plain = train(Recipe(**{**base, "distill": 0.5}), str(tarball), tmp_path / "plain", progress=False)
    dgd = train(Recipe(**{**base, "distill": 0.5, "attn_distill": 1.0}), str(tarball), tmp_path / "dgd", progress=False)
    assert np.isfinite(dgd["train_loss"]) and dgd["train_loss"] != plain["train_loss"]


def test_fine_tuning_a_float_run_into_channel_scales(tmp_path, tarball):
    """TerViT's route from a float model: --init a float run into per-channel ternary scales
    (scale_granularity may change, like the attention's numerics); a run of other shapes is refused."""
    float_run = Recipe(**{**RECIPE.__dict__, "epochs": 1, "float_epochs": 1})
    train(float_run, str(tarball), tmp_path / "float", progress=False)
    src = str(tmp_path / "float" / "last.pt")
    channel = RECIPE.config_overrides[:-1] + ', "scale_granularity": "channel"}'
    tuned = Recipe(**{**RECIPE.__dict__, "epochs": 1, "config_overrides": channel, "init": src, "int8_epochs": 1})
    train(tuned, str(tarball), tmp_path / "tervit", progress=False)
    model, _ = load_run(tmp_path / "tervit" / "last.pt")
    assert model.cfg.scale_granularity == "channel"
    wider = Recipe(
        **{**RECIPE.__dict__, "epochs": 1, "init": src, "config_overrides": '{"depth": 1, "dim": 64, "heads": 2}'}
    )
    with pytest.raises(TinyViTError, match="other fields"):
        train(wider, str(tarball), tmp_path / "wider", progress=False)


def test_fine_tuning_into_bitlinear_norms_fits_them_to_keep_each_input(tmp_path):
    """A run with ``bitlinear_norm`` from a file without: the new norms are the init's
    returned layers, and fitting them brings every BitLinear layer's normalized input close
    to the input it normalizes (identity norms would not)."""
    from tinyvit158.train.trainer import fit_bitlinear_norms, init_from
    from tinyvit158.weights import random_checkpoint

    cfg = RECIPE.config()
    save_weights(tmp_path / "w.safetensors", random_checkpoint(cfg, seed=4))
    model = QATViT(cfg.replace(bitlinear_norm=True))
    layers = init_from(model, str(tmp_path / "w.safetensors"), "cpu")
    assert layers == sorted(layer for layer in cfg.linear_shapes() if cfg.is_ternary(layer))
    images, _ = make_images(16, 5)

    def input_errors():
        seen = {}
        hooks = [model.get_submodule(layer).norm.register_forward_hook(
            lambda mod, inp, out, layer=layer: seen.__setitem__(layer, float(((out - inp[0]) ** 2).mean()
                                                                               / (inp[0] ** 2).mean())))
            for layer in layers]  # fmt: skip
        torch_logits(model, images)
        for h in hooks:
            h.remove()
        return seen

    before = input_errors()
    fit_bitlinear_norms(model, images, layers)
    after = input_errors()
    assert all(after[layer] <= before[layer] for layer in layers), (before, after)  # fitted on these very images
    assert sum(after.values()) < 0.2 * sum(before.values()), (before, after)
