"""The package's errors: one base class, a few subclasses callers may want to tell apart.

Every message says what was expected, what was found, and how to fix it; the command-line
tools print ``str(error)`` as one line on stderr and exit with status 1.
"""


class TinyViTError(ValueError):
    """Base class of every error tinyvit158 raises on purpose."""


class ConfigError(TinyViTError):
    """A model configuration that cannot describe a working ViT."""


class WeightFileError(TinyViTError):
    """A weight file that is missing, corrupt, or does not match its own config."""


class PackingError(TinyViTError):
    """Packed ternary bytes holding codes that no weight maps to."""


class ImageError(TinyViTError):
    """An image file or array that cannot be read or used."""
