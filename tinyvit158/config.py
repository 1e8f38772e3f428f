"""Model configuration: one frozen dataclass, named presets, and validation.

The config travels inside every weight file as JSON (see ``weights.py``), so a file
always says what it holds. ``ViTConfig.from_dict`` rejects unknown keys and impossible
shapes with a :class:`~tinyvit158.errors.ConfigError` that says how to fix them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from tinyvit158.errors import ConfigError

PACKINGS = ("ternary2", "ternary3")
GRANULARITIES = ("tensor", "channel")
ATTENTION_MODES = ("float", "int8")
# every block's layers and norms, by their names under ``blocks.{i}.`` (timm's), in order
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
BLOCK_NORMS = ("norm1", "norm2")
NUMERICS = ("float", "integer")
ATTENTION_BITS = range(2, 9)  # code widths of q, k, v and of the probabilities
PROB_CLIPS = tuple(2.0**-k for k in range(9))  # attention_prob_clip: 1, 1/2, ..., 1/256

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    """Shapes and numerics of a ternary ViT (timm's ``VisionTransformer`` layout).

    Attributes
    ----------
    image_size, patch_size : int
        Square input side and patch side in pixels; ``image_size % patch_size == 0``.
    dim, depth, heads : int
        Embedding width, number of blocks, attention heads (``dim % heads == 0``).
    mlp_ratio : float
        MLP hidden width is ``dim * mlp_ratio`` (must be a whole number).
    num_classes, class_names
        Classifier outputs and their labels (``len(class_names) == num_classes``).
    norm_eps : float
        LayerNorm epsilon (timm ViTs use 1e-6).
    packing : {"ternary2", "ternary3"}
        Bit-packed storage of ternary weights (2 bits or 1.6 bits per weight).
    scale_granularity : {"tensor", "channel"}
        One absmean weight scale per tensor (BitNet b1.58) or per output channel (TerViT).
    ternary_patch_embed, ternary_head : bool
        Whether the patch embedding / classifier head are ternary (else float32).
        The blocks' linears (qkv, proj, fc1, fc2) are always ternary.
    attention : {"float", "int8"}
        How Q K^T and softmax(.) V are computed: in float (float64 in the engine, rounded
        to float32), or fully quantized as in Q-ViT: q, k, v as ``attention_bits`` codes,
        exact integer Q K^T and P V, probabilities as ``attention_prob_bits`` unsigned codes
        (``kernels/qattn.py`` gives the exact rules).
    attention_bits, attention_prob_bits : int
        Code widths (2..8) of q, k, v and of the attention probabilities in ``"int8"`` mode.
    attention_prob_clip : float
        The top of the probability codes' range, a power of two from 1 down to 2**-8: codes
        ``min(rint(p * L / clip), L)``, scale ``clip / L`` (``L = 2**attention_prob_bits - 1``).
        1 is Q-ViT's uniform map; with 4-bit codes most probabilities of 65 tokens fall
        below 1/(2 L) and round to 0, and a clip of 1/4 keeps them (Q-ViT learns this range
        as an LSQ step size; here it is a calibrated constant). A power of two keeps
        ``L / clip`` exact, so every implementation rounds the same products.
    qk_norm : bool
        Q-ViT's information rectification: a learnable LayerNorm over head_dim on q and on
        k (timm's ``attn.q_norm``/``attn.k_norm``, shared by the heads) before they are
        quantized; ``"int8"`` attention only.
    bitlinear_norm : bool
        ViT-1.58b's BitLinear: an extra LayerNorm on the input of every ternary linear.
    qkv_bias : bool
        Whether the qkv projection has a bias (timm default: yes).
    numerics : str
        ``"float"``: LayerNorm, GELU and softmax in specified float steps between the integer
        products; ``"integer"``: every value from the first codes to the logits an integer
        (``integer.py``; needs ``attention="int8"``).
    mean, std : tuple of 3 floats
        Per-channel input normalization, applied to pixels scaled to [0, 1].
    """

    name: str = "custom"
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    norm_eps: float = 1e-6
    packing: str = "ternary2"
    scale_granularity: str = "tensor"
    ternary_patch_embed: bool = True
    ternary_head: bool = False
    attention: str = "float"
    attention_bits: int = 8
    attention_prob_bits: int = 8
    attention_prob_clip: float = 1.0
    qk_norm: bool = False
    bitlinear_norm: bool = False
    qkv_bias: bool = True
    numerics: str = "float"
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __post_init__(self) -> None:
        # Normalize list-valued fields (from JSON) to tuples so the config stays hashable.
        for name in ("class_names", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    # -- derived shapes ---------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """Patches plus the cls token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden_dim(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, in timm's conv-weight order (c, row, col)."""
        return self.in_chans * self.patch_size**2

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{layer name: (out_features, in_features)}`` for every linear layer, in order."""
        shapes = {"patch_embed.proj": (self.dim, self.patch_dim)}
        D, H = self.dim, self.hidden_dim
        block = dict(zip(BLOCK_LINEARS, [(3 * D, D), (D, D), (H, D), (D, H)], strict=True))
        for i in range(self.depth):
            shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
        shapes["head"] = (self.num_classes, self.dim)
        return shapes

    def is_ternary(self, layer: str) -> bool:
        """Whether the named linear layer holds ternary (packed) weights."""
        if layer == "patch_embed.proj":
            return self.ternary_patch_embed
        if layer == "head":
            return self.ternary_head
        return True

    def has_bias(self, layer: str) -> bool:
        return self.qkv_bias or not layer.endswith(".qkv")

    # -- validation and (de)serialization ---------------------------------------------
    def validate(self) -> None:
        def bad(what: str, fix: str) -> ConfigError:
            return ConfigError(f"invalid config {self.name!r}: {what}; {fix}")

        for name in ("image_size", "patch_size", "in_chans", "dim", "depth", "heads", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be a positive integer, found {value!r}", "set it to e.g. 1 or more")
        if self.image_size % self.patch_size:
            raise bad(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}",
                "pick a patch size that divides the image size",
            )
        if self.dim % self.heads:
            raise bad(f"dim {self.dim} is not divisible by heads {self.heads}", "pick heads that divide dim")
        if not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise bad(f"mlp_ratio must be a positive number, found {self.mlp_ratio!r}", "use e.g. 4.0")
        if not math.isclose(self.dim * self.mlp_ratio, round(self.dim * self.mlp_ratio)):
            raise bad(
                f"dim * mlp_ratio = {self.dim * self.mlp_ratio} is not a whole number",
                "choose mlp_ratio so the MLP hidden width is an integer",
            )
        if len(self.class_names) != self.num_classes:
            raise bad(
                f"{len(self.class_names)} class names for num_classes={self.num_classes}",
                "give exactly one name per class",
            )
        if not all(isinstance(c, str) and c for c in self.class_names):
            raise bad("class names must be non-empty strings", "fix class_names")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise bad(f"norm_eps must be in (0, 1), found {self.norm_eps!r}", "use e.g. 1e-6")
        for name, allowed in (
            ("packing", PACKINGS),
            ("scale_granularity", GRANULARITIES),
            ("attention", ATTENTION_MODES),
            ("numerics", NUMERICS),
        ):
            if getattr(self, name) not in allowed:
                raise bad(f"{name} is {getattr(self, name)!r}", f"use one of {', '.join(allowed)}")
        for name in ("attention_bits", "attention_prob_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value not in ATTENTION_BITS:
                raise bad(f"{name} must be an integer from 2 to 8, found {value!r}", "use 8 or 4")
        clip = self.attention_prob_clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip not in PROB_CLIPS:
            raise bad(
                f"attention_prob_clip must be a power of two from 1 down to 2**-8, found {clip!r}",
                "use 1, 0.5, 0.25 or 0.125",
            )
        if self.numerics == "integer" and (self.attention != "int8" or self.qk_norm or self.bitlinear_norm):
            raise bad(
                "numerics='integer' needs attention='int8' (its attention is integer) and no qk_norm or bitlinear_norm",
                "set attention to 'int8' and qk_norm, bitlinear_norm to false",
            )
        if self.qk_norm and self.attention != "int8":
            raise bad("qk_norm needs attention='int8'", "set attention to 'int8' or qk_norm to false")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.in_chans or not all(isinstance(v, (int, float)) for v in values):
                raise bad(f"{name} must hold {self.in_chans} numbers, found {values!r}", "give one per channel")
        if not all(s > 0 for s in self.std):
            raise bad(f"std must be positive, found {self.std!r}", "fix std")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("class_names", "mean", "std"):
            d[name] = list(d[name])
        return d

    def to_json(self) -> str:
        """The weight file's ``config`` metadata; ``numerics`` only when not "float", so float
        files are byte for byte what they were before the field existed."""
        d = self.to_dict()
        if d["numerics"] == "float":
            del d["numerics"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, found {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:  # e.g. a list where a number belongs
            raise ConfigError(f"malformed config: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with some fields changed, validated again (e.g. ``cfg.replace(depth=2)``);
        an unknown or malformed field is one ConfigError."""
        return self.from_dict({**self.to_dict(), **changes})


def _imagenet(name: str, dim: int, depth: int, heads: int) -> ViTConfig:
    return ViTConfig(
        name=name,
        image_size=224,
        patch_size=16,
        dim=dim,
        depth=depth,
        heads=heads,
        num_classes=1000,
        class_names=tuple(f"class_{i}" for i in range(1000)),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


PRESETS: dict[str, ViTConfig] = {
    "cifar10-tiny": ViTConfig(name="cifar10-tiny"),
    # The shapes of DeiT-Tiny/Small and ViT-B/16 (weights are random unless you export some).
    "deit-tiny": _imagenet("deit-tiny", dim=192, depth=12, heads=3),
    "deit-small": _imagenet("deit-small", dim=384, depth=12, heads=6),
    "vit-base-16": _imagenet("vit-base-16", dim=768, depth=12, heads=12),
}


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as config changes: VALUE is JSON (``depth=2``,
    ``qk_norm=true``, ``attention='"int8"'``) or, when it is not JSON, a plain string
    (``attention=int8``)."""
    changes: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set attention=int8")
        try:
            changes[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip()] = value
    return changes


def get_preset(name: str) -> ViTConfig:
    """The named preset; raises ConfigError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


__all__ = ["PRESETS", "ViTConfig", "get_preset", "parse_set"]
