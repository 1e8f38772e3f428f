import json
import os

import numpy as np
import pytest
import safetensors.numpy

from tinyvit158 import WeightFileError, get_preset
from tinyvit158.errors import TinyViTError
from tinyvit158.weights import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Checkpoint,
    load_weights,
    random_checkpoint,
    save_weights,
    tensor_spec,
)

CFG = get_preset("cifar10-tiny").replace(depth=2)


@pytest.fixture(scope="module")
def ckpt():
    return random_checkpoint(CFG, seed=3)


def write_raw(path, tensors, metadata):
    """Write a file bypassing validation, to build corrupt files."""
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata)
    return path


def split_file(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def good_metadata(cfg=CFG):
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": cfg.to_json(), "source": "{}"}


@pytest.mark.parametrize("packing", ["ternary2", "ternary3"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_round_trip_is_bit_identical(tmp_path, packing, granularity):
    cfg = CFG.replace(packing=packing, scale_granularity=granularity, bitlinear_norm=True, ternary_head=True)
    ck = random_checkpoint(cfg, seed=1)
    save_weights(tmp_path / "a.safetensors", ck)
    back = load_weights(tmp_path / "a.safetensors")
    assert back.config == cfg and back.source == ck.source
    assert set(back.tensors) == set(tensor_spec(cfg))
    for name, t in ck.tensors.items():
        assert back.tensors[name].dtype == t.dtype and np.array_equal(back.tensors[name], t), name
    save_weights(tmp_path / "b.safetensors", back)
    # the safetensors writer orders header keys arbitrarily, so compare the parsed header and the payload
    assert split_file(tmp_path / "a.safetensors") == split_file(tmp_path / "b.safetensors")


def test_float_layers_round_trip(tmp_path):
    cfg = CFG.replace(ternary_patch_embed=False, qkv_bias=False)
    ck = random_checkpoint(cfg)
    assert ck.tensors["patch_embed.proj.weight"].shape == (192, 3, 4, 4)  # timm's conv shape
    assert "blocks.0.attn.qkv.bias" not in ck.tensors
    save_weights(tmp_path / "f.safetensors", ck)
    assert np.array_equal(load_weights(tmp_path / "f.safetensors").tensors["head.weight"], ck.tensors["head.weight"])


def test_packed_file_is_small(tmp_path, ckpt):
    full = random_checkpoint(get_preset("cifar10-tiny"))
    save_weights(tmp_path / "t.safetensors", full)
    assert os.path.getsize(tmp_path / "t.safetensors") < 1_000_000


def corrupt_cases(ck):
    t = ck.tensors
    scale = "blocks.1.mlp.fc1.weight_scale"
    packed = "blocks.0.attn.qkv.weight_packed"
    bad_code = t[packed].copy()
    bad_code[3, 5] |= 0b11  # code 3 is unused in ternary2
    nan_scale = t[scale].copy()
    nan_scale[0] = np.nan
    without = {k: v for k, v in t.items() if k != "blocks.1.norm2.bias"}
    return {
        "missing tensor": (without, good_metadata(), "blocks.1.norm2.bias"),
        "extra tensor": ({**t, "blocks.9.extra": np.zeros(3, np.float32)}, good_metadata(), "blocks.9.extra"),
        "misshapen tensor": ({**t, "pos_embed": t["pos_embed"][:, :10]}, good_metadata(), "pos_embed"),
        "wrong dtype": ({**t, "cls_token": t["cls_token"].astype(np.float64)}, good_metadata(), "cls_token"),
        "out-of-range code": ({**t, packed: bad_code}, good_metadata(), packed),
        "NaN scale": ({**t, scale: nan_scale}, good_metadata(), scale),
        "config contradicts shapes": (t, good_metadata(CFG.replace(dim=96)), "cls_token"),
        "wrong format name": (t, {**good_metadata(), "format": "gguf"}, "format is 'gguf'"),
        "no metadata": (t, None, "format is None"),
        "wrong version": (t, {**good_metadata(), "format_version": "99"}, "format_version is '99'"),
        "bad config": (t, {**good_metadata(), "config": "{not json"}, "bad config metadata"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases(random_checkpoint(CFG))))
def test_each_corruption_is_one_clear_error(tmp_path, ckpt, case):
    tensors, metadata, needle = corrupt_cases(ckpt)[case]
    path = write_raw(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(WeightFileError) as e:
        load_weights(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_truncated_and_garbage_files(tmp_path, ckpt):
    save_weights(tmp_path / "ok.safetensors", ckpt)
    data = (tmp_path / "ok.safetensors").read_bytes()
    for name, content in [("trunc", data[: len(data) // 2]), ("header", data[:20]), ("empty", b""), ("text", b"hello")]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(WeightFileError, match="not a readable safetensors file"):
            load_weights(p)
    with pytest.raises(WeightFileError, match="no such weight file"):
        load_weights(tmp_path / "missing.safetensors")
    with pytest.raises(WeightFileError, match="is a directory, not a file"):
        load_weights(tmp_path)


def test_version_mismatch_gives_a_hint(tmp_path, ckpt):
    path = write_raw(tmp_path / "v.safetensors", ckpt.tensors, {**good_metadata(), "format_version": "2"})
    with pytest.raises(WeightFileError, match="HINT"):
        load_weights(path)


def test_invalid_checkpoint_is_never_written(tmp_path, ckpt):
    bad = Checkpoint(ckpt.config, {k: v for k, v in ckpt.tensors.items() if k != "norm.weight"})
    with pytest.raises(WeightFileError, match="norm.weight"):
        save_weights(tmp_path / "x.safetensors", bad)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path, ckpt, monkeypatch):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"previous contents")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(TinyViTError, match="could not be written .disk full"):
        save_weights(target, ckpt)
    assert target.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_source_metadata_is_kept(tmp_path):
    ck = random_checkpoint(CFG)
    ck.source = {"recipe": "test", "accuracy": 0.5}
    save_weights(tmp_path / "s.safetensors", ck)
    assert load_weights(tmp_path / "s.safetensors").source == {"recipe": "test", "accuracy": 0.5}
    with safetensors.safe_open(str(tmp_path / "s.safetensors"), "numpy") as f:
        assert json.loads(f.metadata()["config"])["depth"] == 2


@pytest.mark.parametrize("packing,ratio", [("ternary2", 16.0), ("ternary3", 19.0)])
def test_cifar10_tiny_packed_sizes(packing, ratio):
    from tinyvit158.weights import size_summary

    s = size_summary(random_checkpoint(get_preset("cifar10-tiny").replace(packing=packing)))
    if packing == "ternary2":
        assert s["packed"] * 16 == s["float32_replaced"]  # exactly 1/16: every K is a multiple of 4
    else:
        assert s["packed"] * ratio <= s["float32_replaced"]  # ceil(K/5) bytes: at most 1/19
    assert s["total"] * 12 < s["float32_total"]  # the whole model, scales and float tensors included


def test_saved_file_has_ordinary_permissions(tmp_path, ckpt):
    save_weights(tmp_path / "w.safetensors", ckpt)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_wheel_ships_every_weight_file_and_the_examples():
    """pyproject's force-include puts each shipped file in the package, where
    ``shipped_path``, ``shipped_weight_files`` and ``shipped_examples`` look first."""
    import re
    from pathlib import Path

    from tinyvit158.weights import shipped_example, shipped_examples, shipped_weight_files

    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    included = dict(re.findall(r'^"([^"]+)" = "([^"]+)"$', text, re.M))
    for f in sorted((root / "weights").glob("*.safetensors")):
        assert included.get(f"weights/{f.name}") == f"tinyvit158/_weights/{f.name}", f.name
    assert included.get("examples") == "tinyvit158/_examples"
    assert [p.name for p in shipped_weight_files()] == sorted(
        f.name for f in (root / "weights").glob("*.safetensors") if not f.name.endswith(".golden.safetensors")
    )
    assert [p.name for p in shipped_examples()] == sorted(p.name for p in (root / "examples").glob("*.jpg"))
    assert shipped_example("cat").name == "cat.jpg"
    with pytest.raises(TinyViTError, match="no shipped example image 'lion'; there are: airplane"):
        shipped_example("lion")
