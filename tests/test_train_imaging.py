"""Training images: decoding (EXIF orientation, transparency, bad bytes) and the resize + crop with the numbers
SDXL's size conditioning takes."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from llmdiff_core.training.imaging import BadImage, decode, prepare


def _gradient(w: int, h: int) -> Image.Image:
    """Every pixel different: a crop at the wrong offset cannot give the same values."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    rgb = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("w, h, size, top_left", [(60, 40, (48, 32), (0, 8)), (40, 60, (32, 48), (8, 0)),
                                                  (32, 32, (32, 32), (0, 0))], ids=["wide", "tall", "square"])
def test_the_short_side_is_resized_and_the_centre_cropped(w: int, h: int, size: tuple, top_left: tuple) -> None:
    img = _gradient(w, h)
    got = prepare(img, 32)
    assert got.original_size == (h, w) and got.crop_top_left == top_left
    top, left = top_left
    resized = img.resize(size, Image.LANCZOS) if size != (w, h) else img
    want = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
    assert got.pixels.shape == (32, 32, 3) and got.pixels.dtype == torch.float32
    assert torch.equal(got.pixels, torch.from_numpy(want))


def test_a_random_crop_is_reported_where_it_was_taken() -> None:
    img = _gradient(90, 40)  # resized to 72 x 32: the crop can start anywhere in 0..40 across
    resized = np.asarray(img.resize((72, 32), Image.LANCZOS), dtype=np.float32) / 255.0
    lefts = set()
    for seed in range(6):
        got = prepare(img, 32, "random", random.Random(seed))
        top, left = got.crop_top_left
        assert top == 0 and 0 <= left <= 40
        assert torch.equal(got.pixels, torch.from_numpy(resized[top:top + 32, left:left + 32].copy()))
        lefts.add(left)
    assert len(lefts) > 1  # random, and the same for the same seed:
    assert prepare(img, 32, "random", random.Random(3)).crop_top_left == prepare(img, 32, "random",
                                                                               random.Random(3)).crop_top_left


def test_exif_orientation_is_applied() -> None:
    img = _gradient(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    decoded = decode(_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (32, 48)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode: str) -> None:
    base = Image.new("RGBA", (8, 8), (200, 0, 0, 0))  # fully transparent red: its colour must not show
    base.putpixel((0, 0), (0, 0, 255, 255))
    if mode == "LA":
        img = Image.new("LA", (8, 8), (50, 0))
        img.putpixel((0, 0), (0, 255))
    elif mode == "P":
        img = base.convert("P")
        img.info["transparency"] = img.getpixel((1, 1))
    else:
        img = base
    decoded = decode(_bytes(img, "PNG"))
    rgb = np.asarray(decoded)
    assert decoded.mode == "RGB"
    assert (rgb[1:, 1:] == 255).all()  # transparent: white
    assert tuple(rgb[0, 0]) == ((0, 0, 255) if mode != "LA" else (0, 0, 0))  # opaque: its own colour


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_grayscale_image_keeps_its_tones(fmt: str) -> None:
    """PIL's convert("RGB") clips 16-bit values at 255: such an image trained as nearly all white."""
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    img = decode(_bytes(Image.fromarray(ramp), fmt))
    assert img.mode == "RGB"
    rgb = np.asarray(img, dtype=np.int64)
    want = (ramp.astype(np.int64) * 255 + 32767) // 65535
    assert all(np.array_equal(rgb[..., c], want) for c in range(3))
    assert rgb.min() == 0 and rgb.max() == 255


def test_a_float_image_is_a_bad_image_not_a_guess() -> None:
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    with pytest.raises(BadImage, match="floating-point image"):
        decode(_bytes(Image.fromarray(ramp, "F"), "TIFF"))


def test_grayscale_becomes_three_equal_channels() -> None:
    rgb = np.asarray(decode(_bytes(Image.new("L", (4, 4), 77), "PNG")))
    assert rgb.shape == (4, 4, 3) and (rgb == 77).all()


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.mark.parametrize("data", [b"", b"not an image", _bytes(_gradient(8, 8), "PNG")[:60],
                                  _png_header_only(40000, 40000)],
                         ids=["empty", "text", "truncated", "decompression bomb"])
def test_undecodable_bytes_are_a_bad_image(data: bytes) -> None:
    with pytest.raises(BadImage):
        decode(data)


@pytest.mark.parametrize("resolution, step, ratio", [(1024, 64, 2.0), (512, 64, 2.0), (768, 32, 4.0), (512, 64, 1.0)])
def test_bucket_sizes_cover_the_ratios_at_about_the_resolution_s_area(resolution: int, step: int, ratio: float) -> None:
    from llmdiff_core.training.buckets import bucket_sizes, nearest_bucket

    buckets = bucket_sizes(resolution, step, ratio)
    assert buckets[0] == (resolution, resolution)
    assert len(set(buckets)) == len(buckets) and set(buckets) == {(w, h) for h, w in buckets}  # transposes too
    for h, w in buckets:
        assert h % step == 0 and w % step == 0 and max(h, w) <= ratio * min(h, w)
        assert h * w <= resolution ** 2 and (min(h, w) + step) * max(h, w) > resolution ** 2  # short side: the most
    widest = max(buckets, key=lambda s: s[1] / s[0])  # the next width's bucket would be too elongated
    wider = widest[1] + step
    assert wider > ratio * (resolution ** 2 // wider // step * step)
    if resolution == 1024 and ratio == 2.0:  # SDXL's usual landscape sizes
        assert [f"{w}x{h}" for h, w in buckets if w > h] == ["1088x960", "1152x896", "1216x832", "1280x768",
                                                              "1344x768", "1408x704"]
    # every image goes to the bucket nearest its aspect ratio; a square one to the square
    assert nearest_bucket(300, 300, buckets) == (resolution, resolution)
    for h, w in buckets:
        assert nearest_bucket(h * 3, w * 3, buckets) == (h, w)


def test_a_bucket_target_covers_and_crops_a_non_square_size() -> None:
    img = _gradient(90, 40)  # to 48 x 80 (height x width): scaled by 1.2 to 108 x 48, the middle 80 across
    got = prepare(img, (48, 80))
    assert got.pixels.shape == (48, 80, 3) and got.crop_top_left == (0, 14) and got.original_size == (40, 90)
    want = np.asarray(img.resize((108, 48), Image.LANCZOS).crop((14, 0, 94, 48)), dtype=np.float32) / 255.0
    assert torch.equal(got.pixels, torch.from_numpy(want))
