"""Images in, normalized float32 tensors out.

Any file Pillow reads (PNG, JPEG, BMP, GIF (first frame), WebP, TIFF, ...) or a NumPy
uint8 array [H, W, 3] becomes a float32 [3, S, S] tensor for a model of image size S:

1. EXIF orientation is applied (a phone photo stands the right way up);
2. every mode becomes RGB: 16-bit and 32-bit integer grays are scaled to 8 bits, float
   images are read as [0, 1], images with transparency are composited on the model's mean
   colour (so transparent pixels normalize to zero), CMYK, palette and gray convert;
3. images smaller than 8 x 8 pixels are refused; the shorter side is resized to S
   (bicubic, antialiased) and the centre S x S is cropped;
4. pixels scaled to [0, 1] are normalized with the config's per-channel mean and std.

Pillow's decompression-bomb guard stays on: a header claiming more than twice
``Image.MAX_IMAGE_PIXELS`` pixels is refused before any pixel is decoded (its warning for
images between one and two times the limit is not shown: they are decoded as any other).
JPEGs are decoded in draft mode, at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that still
covers the model's size (fast and light for a phone photo), so a JPEG may claim up to
64 times the limit (a 200 MP photo decodes as 3 MP). Whatever the format, an image
whose decoded size is over ``MAX_DECODED_PIXELS`` (40 MP) is refused before it is
decoded, so that memory stays bounded (with ``--workers N``, N times that at most); one
full-size copy is held while it is decoded, resized and cropped. A URL is refused:
download it first.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tinyvit158.config import ViTConfig
from tinyvit158.errors import ImageError, TinyViTError
from tinyvit158.files import input_problem

MIN_SIDE = 8  # pixels: smaller images hold too little to classify (a 1x1 image is one colour)
# an image decoded at full size (all but JPEG) may hold this many pixels: a 40 MP RGB image
# peaks at ~0.2 GB while it is decoded (RGBA, composited, ~0.6 GB), and so each worker
MAX_DECODED_PIXELS = 40_000_000
JPEG_DRAFT_FACTOR = 64  # the largest pixel-count reduction of JPEG draft decoding (1/8 a side)
_LIMIT_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-wide
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # scheme://...: refused, never fetched


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """Modes I;16*, I and F -> L, with their full range mapped onto 0..255."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0.0, 1.0) * 255.0
    elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = np.clip(a.astype(np.float64), 0, 65535) / 257.0  # 16-bit range -> 8-bit
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    """Convert any Pillow mode to RGB (transparency composited on ``background``)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _gray_to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        base = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(base, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the centre ``size`` x ``size``."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def normalize(rgb: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W], ``(pixel / 255 - mean) / std``."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _open_jpeg_beyond_the_limit(path: Path, size: int) -> Image.Image | None:
    """A JPEG whose header claims more than the bomb limit, opened in draft mode if its
    reduced size is within the limit; else None."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return None
    with _LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is None:
            return None
        Image.MAX_IMAGE_PIXELS = limit * JPEG_DRAFT_FACTOR
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    img.draft(None, (size, size))
    if img.size[0] * img.size[1] > 2 * limit:
        img.close()
        return None
    return img


def _orient_convert(img: Image.Image, path: Path, background, size: int) -> Image.Image:
    img.seek(0)  # first frame of an animation
    if img.format == "JPEG":
        img.draft(None, (size, size))  # decode at 1/2, 1/4 or 1/8 scale when that still covers the size
    w, h = img.size
    if w * h > MAX_DECODED_PIXELS:
        raise ImageError(
            f"{path}: refused, {w}x{h} pixels decoded at full size is over the {MAX_DECODED_PIXELS // 10**6} MP "
            "that an image may take (to bound memory); downscale it first"
        )
    ImageOps.exif_transpose(img, in_place=True)
    if min(img.size) < MIN_SIDE:
        w, h = img.size
        raise ImageError(f"{path}: image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    return to_rgb(img, background)


def open_rgb(path: str | os.PathLike, cfg: ViTConfig, size: int | None = None) -> Image.Image:
    """Open, orient and convert an image file to RGB; any failure is one ImageError.
    ``size``: resize and centre-crop to ``size`` x ``size`` (:func:`resize_center_crop`)
    before the decoded image is let go, so that only one full-size copy is ever held."""
    if URL.match(os.fspath(path)):
        raise ImageError(f"{os.fspath(path)}: a URL; only local files are read (download it first)")
    path = Path(path)
    problem = input_problem(path)
    if problem:
        raise ImageError(f"{path}: {problem.replace('not a file', 'not an image')}")
    background = tuple(int(round(m * 255)) for m in cfg.mean)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(path)
            except Image.DecompressionBombError:
                img = _open_jpeg_beyond_the_limit(path, cfg.image_size)
                if img is None:
                    raise
            with img:
                rgb = _orient_convert(img, path, background, cfg.image_size)
                return resize_center_crop(rgb, size) if size else rgb.copy() if rgb is img else rgb
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused, too many pixels ({e}); a decompression bomb?") from None
    except UnidentifiedImageError:
        size = path.stat().st_size
        what = "an empty file" if size == 0 else "not an image Pillow can read"
        raise ImageError(f"{path}: {what}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None


def load_image(source: str | os.PathLike | np.ndarray, cfg: ViTConfig) -> np.ndarray:
    """An image file or uint8 array [H, W, 3] -> normalized float32 [3, S, S] for ``cfg``."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3 or min(source.shape[:2]) < MIN_SIDE:
            raise ImageError(
                f"expected a uint8 array of shape (H, W, 3) with H, W >= {MIN_SIDE}, "
                f"found {source.dtype} {source.shape}; "
                "convert with np.asarray(pil_image.convert('RGB'))"
            )
        img = Image.fromarray(source, mode="RGB")
    else:
        img = open_rgb(source, cfg, cfg.image_size)
    img = resize_center_crop(img, cfg.image_size)
    return normalize(np.asarray(img), cfg)


def decode(source: str | os.PathLike | np.ndarray, cfg: ViTConfig) -> np.ndarray | str:
    """:func:`load_image`, or the one-line reason it failed (a batch goes on without it)."""
    try:
        return load_image(source, cfg)
    except TinyViTError as e:
        return str(e)
