"""docs/FORMAT.md is enough to read a weight file: a reader written from it alone (the
container's bytes, the packings' bit and digit order) gets the library's codes and scales."""

import json

import numpy as np
import pytest

from tinyvit158 import get_preset
from tinyvit158.convert import change_numerics
from tinyvit158.weights import load_weights, random_checkpoint, save_weights


def read_by_the_spec(path):
    """Section 1: 8-byte little-endian header length, JSON header, raw little-endian data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    meta = header.pop("__metadata__")
    data = raw[8 + n :]
    tensors = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        dtype = {"U8": "<u1", "F32": "<f4"}[t["dtype"]]
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(t["shape"])
    return meta, tensors


def unpack_by_the_spec(packed, k, packing):
    """Section 5, weight by weight."""
    rows = []
    for row in packed:
        codes = []
        for j in range(k):
            if packing == "ternary2":
                c = (int(row[j // 4]) >> (2 * (j % 4))) & 3
                assert c != 3
                codes.append({0: 0, 1: 1, 2: -1}[c])
            else:
                b = int(row[j // 5])
                assert b < 243
                codes.append((b // 3 ** (j % 5)) % 3 - 1)
        rows.append(codes)
    return np.array(rows, dtype=np.int8)


@pytest.mark.parametrize("packing", ["ternary2", "ternary3"])
def test_a_reader_written_from_the_spec(tmp_path, packing):
    cfg = get_preset("cifar10-tiny").replace(depth=1, dim=24, heads=2, mlp_ratio=2.0)
    ckpt = change_numerics(random_checkpoint(cfg, seed=4), {"packing": packing, "attention": "int8"})
    save_weights(tmp_path / "w.safetensors", ckpt)
    meta, tensors = read_by_the_spec(tmp_path / "w.safetensors")
    assert meta["format"] == "tinyvit158" and meta["format_version"] == "1"
    config = json.loads(meta["config"])
    assert config["packing"] == packing and config["attention"] == "int8"
    lib = load_weights(tmp_path / "w.safetensors")
    k_of = {"patch_embed.proj": config["in_chans"] * config["patch_size"] ** 2}  # K from the config alone
    for i in range(config["depth"]):
        d, f = config["dim"], int(config["dim"] * config["mlp_ratio"])
        k_of.update({f"blocks.{i}.attn.qkv": d, f"blocks.{i}.attn.proj": d, f"blocks.{i}.mlp.fc1": d,
                     f"blocks.{i}.mlp.fc2": f})  # fmt: skip
    for layer, k in k_of.items():
        codes = unpack_by_the_spec(tensors[f"{layer}.weight_packed"], k, packing)
        assert np.array_equal(codes, lib.ternary(layer)[0]), layer
        assert np.array_equal(tensors[f"{layer}.weight_scale"], lib.ternary(layer)[1])
    assert tensors["pos_embed"].shape == (1, (config["image_size"] // config["patch_size"]) ** 2 + 1, config["dim"])


def test_the_spec_lists_every_config_field():
    from pathlib import Path

    from tinyvit158.config import ViTConfig

    spec = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    for field in ViTConfig.__dataclass_fields__:
        assert f"`{field}`" in spec, field
