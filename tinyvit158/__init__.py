"""tinyvit158: a small, exact, fast reference engine for 1.58-bit (ternary) Vision Transformers."""

__version__ = "0.1.0"

from tinyvit158.config import PRESETS, ViTConfig, get_preset
from tinyvit158.errors import (
    ConfigError,
    ImageError,
    PackingError,
    TinyViTError,
    WeightFileError,
)

__all__ = [
    "PRESETS",
    "ConfigError",
    "ImageError",
    "PackingError",
    "TinyViTError",
    "ViTConfig",
    "WeightFileError",
    "__version__",
    "get_preset",
]
