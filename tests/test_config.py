import json

import pytest

from tinyvit158 import PRESETS, ConfigError, ViTConfig, get_preset


def test_presets_have_the_published_shapes():
    tiny = get_preset("cifar10-tiny")
    assert (tiny.image_size, tiny.patch_size, tiny.dim, tiny.depth, tiny.heads, tiny.hidden_dim) == (
        32,
        4,
        192,
        6,
        3,
        768,
    )
    assert tiny.num_tokens == 65 and tiny.num_classes == 10 and tiny.class_names[0] == "airplane"
    for name, dim, heads in [("deit-tiny", 192, 3), ("deit-small", 384, 6), ("vit-base-16", 768, 12)]:
        c = get_preset(name)
        assert (c.image_size, c.patch_size, c.dim, c.depth, c.heads, c.num_classes) == (224, 16, dim, 12, heads, 1000)
        assert c.num_tokens == 197 and c.head_dim == 64


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    cfg = PRESETS[name]
    assert ViTConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["dim"] == cfg.dim


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"heads": 5}, "not divisible by heads"),
        ({"patch_size": 5}, "not divisible by patch_size"),
        ({"depth": 0}, "positive integer"),
        ({"dim": 192.0}, "positive integer"),
        ({"mlp_ratio": 0.001}, "whole number"),
        ({"num_classes": 3}, "class names"),
        ({"packing": "int4"}, "ternary2, ternary3"),
        ({"scale_granularity": "row"}, "tensor, channel"),
        ({"attention": "int4"}, "float, int8"),
        ({"attention": "int8", "attention_bits": 1}, "from 2 to 8"),
        ({"attention": "int8", "attention_prob_bits": 9}, "from 2 to 8"),
        ({"attention": "int8", "attention_prob_clip": 0.3}, "power of two"),
        ({"attention": "int8", "attention_prob_clip": 2.0}, "power of two"),
        ({"attention": "int8", "attention_prob_clip": True}, "power of two"),
        ({"attention_bits": True}, "from 2 to 8"),
        ({"qk_norm": True}, "qk_norm needs attention='int8'"),
        ({"std": (1.0, 0.0, 1.0)}, "positive"),
        ({"mean": (0.5,)}, "3 numbers"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_impossible_configs_are_rejected(changes, match):
    with pytest.raises(ConfigError, match=match):
        get_preset("cifar10-tiny").replace(**changes)


def test_from_dict_rejects_unknown_and_malformed():
    d = get_preset("cifar10-tiny").to_dict()
    with pytest.raises(ConfigError, match="unknown config keys"):
        ViTConfig.from_dict({**d, "dropout": 0.1})
    with pytest.raises(ConfigError, match="not valid JSON"):
        ViTConfig.from_json("{")
    with pytest.raises(ConfigError, match="JSON object"):
        ViTConfig.from_json("[1, 2]")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("resnet50")


def test_linear_shapes_and_ternary_layers():
    cfg = get_preset("cifar10-tiny").replace(depth=1)
    assert cfg.linear_shapes() == {
        "patch_embed.proj": (192, 48),
        "blocks.0.attn.qkv": (576, 192),
        "blocks.0.attn.proj": (192, 192),
        "blocks.0.mlp.fc1": (768, 192),
        "blocks.0.mlp.fc2": (192, 768),
        "head": (10, 192),
    }
    assert cfg.is_ternary("blocks.0.mlp.fc1") and cfg.is_ternary("patch_embed.proj") and not cfg.is_ternary("head")
