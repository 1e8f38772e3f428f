import numpy as np
import pytest
from PIL import Image

from tinyvit158 import ImageError, get_preset
from tinyvit158.image import load_image, normalize

CFG = get_preset("cifar10-tiny")
RED = (200, 10, 30)


def expected(rgb):
    return normalize(np.full((32, 32, 3), rgb, np.uint8), CFG)


def save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,suffix",
    [
        ("RGB", "png"),
        ("RGB", "bmp"),
        ("RGB", "webp"),
        ("RGB", "tiff"),
        ("RGB", "gif"),
        ("P", "png"),
        ("RGBA", "png"),
        ("CMYK", "tiff"),
    ],
)
def test_modes_and_formats_give_the_same_colour(tmp_path, mode, suffix):
    img = Image.new("RGB", (48, 40), RED)
    img = img.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)
    x = load_image(save(img, tmp_path / f"a.{suffix}", **({"lossless": True} if suffix == "webp" else {})), CFG)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    colour = img.convert("RGB").getpixel((0, 0))  # what the mode itself can hold (a palette is coarse)
    np.testing.assert_allclose(x, expected(colour), atol=2.5 / 255 / min(CFG.std))


def test_cmyk_jpeg(tmp_path):
    x = load_image(save(Image.new("CMYK", (40, 40), (0, 200, 180, 40)), tmp_path / "c.jpg", quality=100), CFG)
    rgb = Image.new("CMYK", (1, 1), (0, 200, 180, 40)).convert("RGB").getpixel((0, 0))
    np.testing.assert_allclose(x, expected(rgb), atol=6 / 255 / min(CFG.std))


def test_16bit_gray_png_is_scaled(tmp_path):
    a = np.full((40, 40), 65535 // 2, np.uint16)  # mid gray in 16 bits
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_allclose(load_image(path, CFG), expected((127, 127, 127)), atol=1.01 / 255 / min(CFG.std))


def test_float_tiff_is_read_as_unit_range(tmp_path):
    path = tmp_path / "f.tiff"
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(path)
    np.testing.assert_allclose(load_image(path, CFG), expected((128, 128, 128)), atol=1e-5)


def test_transparency_composites_on_the_mean_colour(tmp_path):
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent
    x = load_image(save(img, tmp_path / "t.png"), CFG)
    assert np.abs(x).max() < 0.01  # the mean colour normalizes to ~0
    la = Image.new("LA", (40, 40), (255, 0))
    assert np.abs(load_image(save(la, tmp_path / "la.png"), CFG)).max() < 0.01


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :30] = 255  # left half white
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees: the white half ends up on the right
    path = save(img, tmp_path / "o.jpg", exif=exif, quality=100)
    x = load_image(path, CFG)
    assert x[:, :, -4:].mean() > x[:, :, :4].mean()


def test_first_gif_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), c) for c in (RED, (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    np.testing.assert_allclose(load_image(path, CFG), expected(RED), atol=3 / 255 / min(CFG.std))


def test_resize_shorter_side_then_center_crop():
    a = np.zeros((64, 128, 3), np.uint8)
    a[:, 24:104] = 255  # the centre square (columns 32..96) and 8 px around it are white
    x = load_image(a, CFG)
    np.testing.assert_allclose(x, expected((255, 255, 255)), atol=1e-5)


def test_arrays_are_checked():
    with pytest.raises(ImageError, match=r"\(H, W, 3\)"):
        load_image(np.zeros((32, 32), np.uint8), CFG)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((32, 32, 3), np.float32), CFG)


def test_tiny_images_are_refused(tmp_path):
    with pytest.raises(ImageError, match="1x1 pixels"):
        load_image(save(Image.new("RGB", (1, 1)), tmp_path / "one.png"), CFG)


def test_large_images_warn_nothing_and_big_jpegs_decode_in_draft_mode(tmp_path, monkeypatch):
    """Between one and two times Pillow's pixel limit an image is decoded without Pillow's
    two-line warning; a JPEG beyond twice the limit is still read, at reduced scale, when
    that scale is within it (a phone photo), while a PNG that size is refused."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[:, :200] = (200, 30, 30)
    rgb[:, 200:] = (30, 30, 200)
    Image.fromarray(rgb[:120, :150]).save(tmp_path / "mid.png")  # 18,000 px: 1.8x the limit
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)  # 120,000 px: 12x the limit
    Image.fromarray(rgb).save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        load_image(tmp_path / "mid.png", CFG)
        x = load_image(tmp_path / "big.jpg", CFG)
    full = normalize(np.asarray(Image.fromarray(rgb).resize((43, 32), Image.Resampling.BICUBIC))[:, 5:37], CFG)
    assert np.abs(x - full).mean() < 0.15  # the same picture, from a 1/8-scale decode (edges move a pixel)
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(tmp_path / "big.png", CFG)
    assert Image.MAX_IMAGE_PIXELS == 10_000  # the limit is restored


def test_urls_are_refused_with_a_hint():
    with pytest.raises(ImageError, match="a URL; only local files are read"):
        load_image("https://example.com/cat.jpg", CFG)
