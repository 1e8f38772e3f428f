"""``python -m tinyvit158.convert``: a weight file with other numerics, tensors unchanged."""

import os

import numpy as np
import pytest
from conftest import run_module

from tinyvit158 import get_preset
from tinyvit158.convert import change_numerics
from tinyvit158.engine import Engine
from tinyvit158.errors import TinyViTError
from tinyvit158.oracle import Oracle
from tinyvit158.weights import load_weights, random_checkpoint, save_weights


def test_int8_attention_from_a_weight_file(tmp_path, weights):
    out = tmp_path / "int8.safetensors"
    proc = run_module("tinyvit158.convert", weights, "--out", out, "--set", "attention=int8", "--set=attention_bits=4")
    assert proc.returncode == 0, proc.stderr
    src, got = load_weights(weights), load_weights(out)
    assert (got.config.attention, got.config.attention_bits, got.config.attention_prob_bits) == ("int8", 4, 8)
    assert got.tensors.keys() == src.tensors.keys()
    assert all(np.array_equal(got.tensors[k], src.tensors[k]) for k in src.tensors)
    assert got.source["converted_from"]["changes"] == {"attention": "int8", "attention_bits": 4}
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert not np.allclose(Engine(got)(x), Engine(src)(x))  # the attention did change
    np.testing.assert_allclose(Engine(got)(x), Oracle(got)(x), rtol=0, atol=0.05 * np.ptp(Oracle(got)(x)))


def test_repacking_keeps_the_codes(tmp_path):
    ckpt = random_checkpoint(get_preset("cifar10-tiny").replace(depth=1), seed=3)
    t3 = change_numerics(ckpt, {"packing": "ternary3"})
    save_weights(tmp_path / "t3.safetensors", t3)
    back = load_weights(tmp_path / "t3.safetensors")
    for layer in ckpt.config.linear_shapes():
        if ckpt.config.is_ternary(layer):
            assert np.array_equal(back.ternary(layer)[0], ckpt.ternary(layer)[0])
    assert back.tensors["blocks.0.attn.qkv.weight_packed"].shape[1] == -(-192 // 5)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--set", "dim=96"], "cannot change without training"),
        (["--set", "qk_norm=true"], "cannot change without training"),
        (["--set", "attention=int4"], "attention is 'int4'"),
        (["--set", "attention"], "expected KEY=VALUE"),
    ],
)
def test_refusals_are_one_line(tmp_path, weights, args, match):
    proc = run_module("tinyvit158.convert", weights, "--out", tmp_path / "x.safetensors", *args)
    assert proc.returncode == 1 and match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_shape_changes_are_refused_in_the_api():
    with pytest.raises(TinyViTError):
        change_numerics(random_checkpoint(get_preset("cifar10-tiny").replace(depth=1)), {"heads": 4})


# -- float models: post-training ternarization ------------------------------------------------
def timm_state_dict(cfg, seed=0, ternary_exact_from=None):
    """A float ViT state dict with timm's names and shapes (random, or a checkpoint's codes x gamma)."""
    rng = np.random.default_rng(seed)
    sd = {"cls_token": rng.normal(0, 0.5, (1, 1, cfg.dim))}
    sd["pos_embed"] = rng.normal(0, 0.5, (1, cfg.num_tokens, cfg.dim))
    for layer, (n, k) in cfg.linear_shapes().items():
        if ternary_exact_from is not None and cfg.is_ternary(layer):
            codes, gamma, _ = ternary_exact_from.ternary(layer)
            w = codes * gamma[:, None].astype(np.float64)
        else:
            w = rng.normal(0, k**-0.5, (n, k))
        if layer == "patch_embed.proj":
            w = w.reshape(n, cfg.in_chans, cfg.patch_size, cfg.patch_size)
        sd[f"{layer}.weight"] = w
        if cfg.has_bias(layer):
            sd[f"{layer}.bias"] = rng.normal(0, 0.05, n)
    for name in [f"blocks.{i}.norm{j}" for i in range(cfg.depth) for j in (1, 2)] + ["norm"]:
        sd[f"{name}.weight"] = 1 + rng.normal(0, 0.1, cfg.dim)
        sd[f"{name}.bias"] = rng.normal(0, 0.05, cfg.dim)
    if ternary_exact_from is not None:
        sd.update({k: v for k, v in ternary_exact_from.tensors.items() if k in sd and not k.endswith("weight")})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def save_safetensors(path, sd):
    import safetensors.numpy

    safetensors.numpy.save_file(sd, str(path))
    return path


def test_a_ternary_exact_float_model_converts_to_its_codes(tmp_path):
    cfg = get_preset("cifar10-tiny").replace(depth=2)
    original = random_checkpoint(cfg, seed=11)
    src = save_safetensors(tmp_path / "float.safetensors", timm_state_dict(cfg, ternary_exact_from=original))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "t.safetensors", "--preset", "cifar10-tiny")
    assert proc.returncode == 0, proc.stderr
    got = load_weights(tmp_path / "t.safetensors")
    assert got.config == cfg.replace(name="cifar10-tiny")  # every shape read back from the tensors
    for layer in cfg.linear_shapes():
        if cfg.is_ternary(layer):
            assert np.array_equal(got.ternary(layer)[0], original.ternary(layer)[0]), layer
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(Engine(got)(x), Oracle(got)(x), rtol=0, atol=0.05 * np.ptp(Oracle(got)(x)))
    assert got.source["converted_from"]["route"] == "post-training ternarization"


@pytest.mark.parametrize("preset", ["deit-tiny", "deit-small"])
def test_deit_shapes_at_224_convert_and_run(tmp_path, preset):
    cfg = get_preset(preset)
    src = save_safetensors(tmp_path / "deit.safetensors", timm_state_dict(cfg, seed=3))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "d.safetensors", "--preset", preset,
                      "--granularity", "channel")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = load_weights(tmp_path / "d.safetensors")
    assert (got.config.image_size, got.config.dim, got.config.depth, got.config.heads) == (224, cfg.dim, 12, cfg.heads)
    assert got.config.scale_granularity == "channel" and got.config.num_classes == 1000
    logits = Engine(got)(np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32))
    assert logits.shape == (1, 1000) and np.all(np.isfinite(logits))


def _malformed(sd, case):
    sd = dict(sd)
    if case == "wrong shape":
        sd["blocks.0.mlp.fc1.weight"] = sd["blocks.0.mlp.fc1.weight"][:, :-1].copy()
    elif case == "missing key":
        del sd["blocks.0.attn.proj.weight"]
    elif case == "unknown key":
        sd["blocks.0.attn.rel_pos"] = np.zeros(3, np.float32)
    elif case == "distillation token":
        sd["dist_token"] = np.zeros((1, 1, 192), np.float32)
    elif case == "NaN":
        sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"].copy()
        sd["blocks.0.norm1.weight"][3] = np.nan
    elif case == "integer tensor":
        sd["head.bias"] = np.zeros(10, np.int32)
    return sd


@pytest.mark.parametrize(
    "case, match",
    [
        ("wrong shape", "'blocks.0.mlp.fc1.weight': shape"),
        ("missing key", "'blocks.0.attn.proj.weight': missing"),
        ("unknown key", "'blocks.0.attn.rel_pos': unknown name"),
        ("distillation token", "'dist_token': a distillation token"),
        ("NaN", "'blocks.0.norm1.weight': holds NaN"),
        ("integer tensor", "'head.bias': dtype int32"),
    ],
)
def test_malformed_float_models_are_one_line(tmp_path, case, match):
    cfg = get_preset("cifar10-tiny").replace(depth=1)
    src = save_safetensors(tmp_path / "bad.safetensors", _malformed(timm_state_dict(cfg), case))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "x.safetensors", "--preset", "cifar10-tiny")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert match in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_heads_must_be_given(tmp_path):
    src = save_safetensors(tmp_path / "f.safetensors", timm_state_dict(get_preset("cifar10-tiny").replace(depth=1)))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "x.safetensors")
    assert proc.returncode == 1 and "--set heads=N" in proc.stderr
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "x.safetensors", "--set", "heads=4")
    assert proc.returncode == 0 and load_weights(tmp_path / "x.safetensors").config.heads == 4


def test_pytorch_files_load_safely(tmp_path):
    torch = pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")
    cfg = get_preset("cifar10-tiny").replace(depth=1)
    sd = {k: torch.from_numpy(v) for k, v in timm_state_dict(cfg).items()}
    torch.save({"model": sd}, tmp_path / "deit_style.pth")  # DeiT wraps its state dict
    proc = run_module("tinyvit158.convert", tmp_path / "deit_style.pth", "--out", tmp_path / "a.safetensors",
                      "--preset", "cifar10-tiny")  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"model": sd, "x": Payload()}, tmp_path / "evil.pth")
    proc = run_module("tinyvit158.convert", tmp_path / "evil.pth", "--out", tmp_path / "b.safetensors",
                      "--preset", "cifar10-tiny")  # fmt: skip
    assert proc.returncode == 1 and "refused" in proc.stderr and not (tmp_path / "pwned").exists()


def test_a_trainer_checkpoint_converts_to_its_own_function(tmp_path):
    """The project's own model saved by the trainer: with latent weights whose ternarization
    is exact, the converted file's engine and the checkpoint's PyTorch model agree."""
    torch = pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")
    from tinyvit158.image import normalize
    from tinyvit158.train.export import torch_logits
    from tinyvit158.train.model import QATViT, latent_state
    from tinyvit158.train.state import load_run, save_checkpoint

    cfg = get_preset("cifar10-tiny").replace(depth=2)
    model = QATViT(cfg)
    model.load_state_dict(latent_state(random_checkpoint(cfg, seed=2)))
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 1}, tmp_path / "run.pt")
    proc = run_module("tinyvit158.convert", tmp_path / "run.pt", "--out", tmp_path / "c.safetensors")
    assert proc.returncode == 0, proc.stderr
    got = load_weights(tmp_path / "c.safetensors")
    images = np.random.default_rng(4).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    twin = torch_logits(load_run(tmp_path / "run.pt")[0], images)
    engine = Engine(got)(np.stack([normalize(im, cfg) for im in images]))
    assert np.array_equal(engine.argmax(1), twin.argmax(1))
    assert np.abs(engine - twin).max() <= 1e-4 * np.abs(twin).max()
    assert torch.is_tensor(load_run(tmp_path / "run.pt")[1]["model"]["head.weight"])


def test_compensation_lowers_the_layer_error_on_images_it_did_not_see():
    from tinyvit158 import ptq
    from tinyvit158.oracle import Oracle

    cfg = get_preset("cifar10-tiny").replace(depth=2, scale_granularity="channel")
    sd = timm_state_dict(cfg, seed=8)
    ckpt, _ = ptq.ternarize_state(sd, cfg, {})
    rng = np.random.default_rng(0)
    calib, unseen = (rng.standard_normal((16, 3, 32, 32)).astype(np.float32) for _ in range(2))
    fixed, report = ptq.compensate(ckpt, sd, calib)
    assert all(after < before for before, after in report.values())  # on the calibration images, by construction
    floats = ptq.float_weights(sd, cfg)

    def error(c):
        total = 0.0
        for layer in filter(cfg.is_ternary, cfg.linear_shapes()):
            x = ptq.layer_inputs(c, unseen, layer)
            w, b = floats[layer]
            total += float(np.mean((Oracle(c).linear(x, layer) - (x @ w.T + b)) ** 2))
        return total

    assert error(fixed) < 0.9 * error(ckpt)
    with pytest.raises(TinyViTError, match="--granularity channel"):
        ptq.compensate(ptq.ternarize_state(sd, cfg.replace(scale_granularity="tensor"), {})[0], sd, calib)


def test_compensate_from_the_command_line(tmp_path):
    from fake_cifar import make_images, write_tarball

    data = write_tarball(tmp_path / "cifar-10-python.tar.gz", make_images(3, 0), make_images(1, 1))
    cfg = get_preset("cifar10-tiny").replace(depth=1)
    src = save_safetensors(tmp_path / "f.safetensors", timm_state_dict(cfg, seed=5))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "c.safetensors", "--preset", "cifar10-tiny",
                      "--granularity", "channel", "--compensate", "--calib", data, "--calib-images", "8")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "compensation: summed layer-output MSE" in proc.stderr
    assert load_weights(tmp_path / "c.safetensors").source["converted_from"]["compensated_on"] == (
        "8 CIFAR-10 training images"
    )


def test_compare_torch_runs_a_float_run_in_float(tmp_path, capsys):
    """evaluate --compare-torch with a float run (the source of a conversion) compares with
    that float model as it is, not with its on-the-fly ternarization."""
    pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")
    from tinyvit158.train.model import BitLinear, QATViT
    from tinyvit158.train.state import load_torch_twin, save_checkpoint

    cfg = get_preset("cifar10-tiny").replace(depth=1)
    model = QATViT(cfg)
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 1}
    save_checkpoint({**state, "log": {"quantized": False}}, tmp_path / "float.pt")
    save_checkpoint({**state, "log": {"quantized": True}}, tmp_path / "qat.pt")
    floats = [m.quantize for m in load_torch_twin(str(tmp_path / "float.pt")).modules() if isinstance(m, BitLinear)]
    assert floats and not any(floats)
    assert "a float model" in capsys.readouterr().err
    qat = [m.quantize for m in load_torch_twin(str(tmp_path / "qat.pt")).modules() if isinstance(m, BitLinear)]
    assert all(qat)


def test_a_float_run_whose_ternarization_is_exact_agrees_with_its_conversion(tmp_path):
    """The project's own float model, saved by the trainer, with every ternary layer's weights
    already +-g (so absmean ternarization is exact: gamma = g, codes = signs): converted, the
    engine computes the float model's function up to its int8 activations."""
    torch = pytest.importorskip("torch", reason="the train extra (torch) is part of the test install")
    from tinyvit158.image import normalize
    from tinyvit158.train.export import torch_logits
    from tinyvit158.train.model import BitLinear, QATViT
    from tinyvit158.train.state import load_torch_twin, save_checkpoint

    cfg = get_preset("cifar10-tiny").replace(depth=2)
    model = QATViT(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitLinear):
                g = float(m.weight.abs().mean())
                m.weight.copy_(torch.where(m.weight >= 0, g, -g))
    run = tmp_path / "float.pt"
    save_checkpoint(
        {"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 1, "log": {"quantized": False}}, run
    )
    proc = run_module("tinyvit158.convert", run, "--out", tmp_path / "c.safetensors")
    assert proc.returncode == 0, proc.stderr
    got = load_weights(tmp_path / "c.safetensors")
    images = np.random.default_rng(6).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    float_logits = torch_logits(load_torch_twin(str(run)), images)  # the float model, not ternarized
    engine = Engine(got)(np.stack([normalize(im, cfg) for im in images]))
    scale = np.abs(float_logits).max()
    assert np.abs(engine - float_logits).max() < 0.05 * scale  # only the int8 rounding of activations
    margin = np.diff(np.sort(float_logits, axis=1)[:, -2:], axis=1)[:, 0]
    clear = margin > 0.1 * scale
    assert clear.any() and np.array_equal(engine.argmax(1)[clear], float_logits.argmax(1)[clear])


# -- ViT-1.58b checkpoints and models that are already ternary ----------------------------------
def vit158b_state_dict(ckpt, buffers: bool, seed: int = 0):
    """``ckpt`` written with ViT-1.58b's names (DLYuanGod/ViT-1.58b): every ternary layer a
    BitLinear whose ``.norm`` is the file's; with ``buffers``, latent weights that are not
    ternary beside the ``quant_weight`` codes and the scalar ``weight_scale`` = 1 / gamma;
    without, the weights are gamma x codes."""
    cfg, rng = ckpt.config, np.random.default_rng(seed)
    sd = {k: v for k, v in ckpt.tensors.items() if not k.endswith(("weight_packed", "weight_scale"))}
    for layer in cfg.linear_shapes():
        if not cfg.is_ternary(layer):
            sd[f"{layer}.weight"] = ckpt.float_weight(layer)
            continue
        codes, gamma, _ = ckpt.ternary(layer)
        w = codes * gamma[:, None]
        if buffers:
            sd[f"{layer}.quant_weight"] = codes.astype(np.float32)
            sd[f"{layer}.weight_scale"] = np.float32(1 / gamma[0]).reshape(())
            w = w * (1 + rng.uniform(-0.3, 0.3, w.shape))  # latent: absmean would give other codes and gamma
        sd[f"{layer}.weight"] = w
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(cfg.dim, cfg.in_chans, cfg.patch_size, -1)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


@pytest.mark.parametrize("buffers", [True, False])
def test_a_vit158b_checkpoint_converts_to_its_bitlinear_model(tmp_path, buffers):
    cfg = get_preset("cifar10-tiny").replace(depth=2, bitlinear_norm=True)
    original = random_checkpoint(cfg, seed=5)
    src = save_safetensors(tmp_path / "vit158b.safetensors", vit158b_state_dict(original, buffers))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "t.safetensors", "--preset", "cifar10-tiny")
    assert proc.returncode == 0, proc.stderr
    route = "from quant_weight and weight_scale" if buffers else "already ternary"
    assert f"ternary layers: 9 {route}" in proc.stderr
    got = load_weights(tmp_path / "t.safetensors")
    assert got.config == cfg.replace(name="cifar10-tiny")  # bitlinear_norm read from the .norm tensors
    for layer in cfg.linear_shapes():
        if cfg.is_ternary(layer):
            (c1, g1, _), (c0, g0, _) = got.ternary(layer), original.ternary(layer)
            assert np.array_equal(c1, c0), layer
            if buffers:  # gamma = 1 / weight_scale: float32 (1 / float32(1 / gamma)), within one ulp
                assert np.all(np.abs(g1 - g0) <= np.spacing(g0)), layer
            else:
                assert np.array_equal(g1, g0), layer
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    if buffers:
        np.testing.assert_allclose(Engine(got)(x), Engine(original)(x), rtol=0, atol=1e-3 * np.ptp(Engine(original)(x)))
    else:
        assert all(np.array_equal(got.tensors[k], original.tensors[k]) for k in original.tensors)
        assert np.array_equal(Engine(got)(x), Engine(original)(x))


def test_lsq_is_the_least_squares_scale_of_the_absmean_codes(tmp_path):
    from tinyvit158 import ptq

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.1, (6, 40))
    codes, gamma, route = ptq.ternary_codes({}, "x", w, "channel", "lsq")
    assert route == "lsq" and np.array_equal(codes, ptq.ternarize(w, "channel")[0])
    for n in range(6):  # d/da ||w - a c||^2 = 0 at a = <w, c> / <c, c>; no other a does better
        a = w[n] @ codes[n] / (codes[n] @ codes[n])
        assert gamma[n] == np.float32(a)
        errs = [np.sum((w[n] - s * codes[n]) ** 2) for s in (a, a * 0.99, a * 1.01, ptq.ternarize(w, "channel")[1][n])]
        assert errs[0] <= min(errs[1:])
    # a weight that is nearly ternary: lsq finds its scale, absmean its scale x the non-zero fraction
    c = rng.integers(-1, 2, (8, 64))
    near = c * 0.02 * (1 + rng.uniform(-1e-3, 1e-3, c.shape))
    _, g_lsq, _ = ptq.ternary_codes({}, "x", near, "tensor", "lsq")
    _, g_abs, _ = ptq.ternary_codes({}, "x", near, "tensor", "absmean")
    assert abs(g_lsq[0] / 0.02 - 1) < 1e-3 and abs(g_abs[0] / 0.02 - np.mean(c != 0)) < 1e-3


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("blocks.0.attn.qkv.weight_scale"), "'blocks.0.attn.qkv.quant_weight': without"),
        (lambda sd: sd["blocks.0.mlp.fc1.quant_weight"].__setitem__((0, 0), 2.0), "codes in -1, 0, 1"),
        (lambda sd: sd.__setitem__("blocks.1.mlp.fc2.weight_scale", np.array([-1], np.float32)), "one positive"),
        (lambda sd: [sd.pop(f"blocks.1.attn.proj.norm.{p}") for p in ("weight", "bias")], "'blocks.1.attn.proj.norm"),
    ],
)
def test_malformed_vit158b_checkpoints_are_one_line(tmp_path, edit, match):
    cfg = get_preset("cifar10-tiny").replace(depth=2, bitlinear_norm=True)
    sd = vit158b_state_dict(random_checkpoint(cfg, seed=5), buffers=True)
    edit(sd)
    src = save_safetensors(tmp_path / "bad.safetensors", sd)
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "x.safetensors", "--preset", "cifar10-tiny")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert match in proc.stderr and not (tmp_path / "x.safetensors").exists()


def test_per_row_ternary_weights_need_channel_scales(tmp_path):
    cfg = get_preset("cifar10-tiny").replace(depth=1, scale_granularity="channel")
    original = random_checkpoint(cfg, seed=8)  # one gamma per row
    src = save_safetensors(tmp_path / "f.safetensors", timm_state_dict(cfg, ternary_exact_from=original))
    args = ["--out", tmp_path / "t.safetensors", "--preset", "cifar10-tiny"]
    proc = run_module("tinyvit158.convert", src, *args)
    assert proc.returncode == 1 and "--granularity channel" in proc.stderr
    proc = run_module("tinyvit158.convert", src, *args, "--granularity", "channel")
    assert proc.returncode == 0, proc.stderr
    got = load_weights(tmp_path / "t.safetensors")
    assert all(np.array_equal(got.tensors[k], original.tensors[k]) for k in original.tensors if "weight_" in k)


def test_the_shipped_model_as_float_gamma_times_codes_converts_back_to_itself(tmp_path):
    """Written as a float timm state dict (each weight exactly gamma x code, one gamma a
    tensor), the shipped model converts per tensor, without calibration, to its own file:
    the same tensors, so the same accuracy (absmean would give gamma x the non-zero fraction)."""
    from pathlib import Path

    shipped = load_weights(Path(__file__).resolve().parents[1] / "weights" / "cifar10-tiny.safetensors")
    src = save_safetensors(tmp_path / "float.safetensors", vit158b_state_dict(shipped, buffers=False))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "t.safetensors", "--preset", "cifar10-tiny")
    assert proc.returncode == 0 and "ternary layers: 25 already ternary" in proc.stderr, proc.stderr
    got = load_weights(tmp_path / "t.safetensors")
    assert got.config.replace(name="x") == shipped.config.replace(name="x")
    assert got.tensors.keys() == shipped.tensors.keys()
    assert all(np.array_equal(got.tensors[k], shipped.tensors[k]) for k in shipped.tensors)


@pytest.mark.parametrize("buffers", [False, True])
def test_the_shipped_bitlinear_model_in_vit158b_names_converts_back(tmp_path, buffers):
    """The shipped BitLinear file written as ViT-1.58b's state dict (gamma x codes, or latent
    weights beside the quant_weight / weight_scale buffers) converts back per tensor without
    calibration: every tensor as it was (buffers: the codes, and gamma = 1 / weight_scale
    within one ulp), so the test accuracy stays (measured on all 10,000 in the model card)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "weights" / "cifar10-tiny-bitlinear.safetensors"
    shipped = load_weights(path)
    src = save_safetensors(tmp_path / "vit158b.safetensors", vit158b_state_dict(shipped, buffers))
    proc = run_module("tinyvit158.convert", src, "--out", tmp_path / "t.safetensors", "--preset", "cifar10-tiny")
    assert proc.returncode == 0, proc.stderr
    got = load_weights(tmp_path / "t.safetensors")
    assert got.config.replace(name="x") == shipped.config.replace(name="x")
    for k, v in shipped.tensors.items():
        if buffers and k.endswith(".weight_scale"):
            assert np.all(np.abs(got.tensors[k] - v) <= np.spacing(v)), k
        else:
            assert np.array_equal(got.tensors[k], v), k
