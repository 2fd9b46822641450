"""Image decoding, resizing and cropping for training (no ComfyUI needed).

An image becomes a float tensor [H, W, 3] in 0..1 (ComfyUI's IMAGE layout, what comfy.sd.VAE.encode
takes) plus the numbers SDXL's size conditioning needs: the original size and the crop offset.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# Refuse decompression bombs the same way PIL does, but as a normal skippable error.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


@dataclass(frozen=True)
class PreparedImage:
    pixels: torch.Tensor  # [H, W, 3] float32 in 0..1
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


class BadImage(Exception):
    """An image that cannot be decoded: the sample is skipped and counted."""


def decode(data: bytes) -> Image.Image:
    """bytes -> RGB PIL image (EXIF orientation applied). Raises BadImage."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith(("I", "F")):
            img = _to_8_bit(img)
        if img.mode != "RGB":
            # Transparent images go onto white, not onto whatever the hidden colour channels hold.
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                bg = Image.new("RGB", img.size, (255, 255, 255))
                bg.paste(img, mask=img.getchannel("A"))
                img = bg
            else:
                img = img.convert("RGB")
        return img
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise BadImage(f"{type(e).__name__}: {e}") from None


def _to_8_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PNG, TIFF: mode I;16 or I) as 8-bit "L". PIL's own convert("RGB") clips its values
    at 255, which turns almost every pixel white. Float images have no range to scale from: refused."""
    if img.mode == "F":
        raise BadImage("a 32-bit floating-point image has no fixed range: save it as 8- or 16-bit")
    values = np.asarray(img, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise BadImage(f"a {img.mode} image with values outside 0..65535: save it as 8- or 16-bit")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")  # (rounded: 65535 -> 255)


def prepare(img: Image.Image, size: int | tuple[int, int], crop: str = "center",
            rng: random.Random | None = None) -> PreparedImage:
    """Resize to cover `size` (Lanczos; a square resolution: the short side to it), crop `size` out.
    size: the resolution (a square) or an aspect-ratio bucket's (height, width)."""
    th, tw = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImage("empty image")
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    resized = img.resize((nw, nh), Image.LANCZOS) if (nw, nh) != (w, h) else img
    if crop == "random":
        rng = rng or random.Random(0)
        top, left = rng.randint(0, nh - th), rng.randint(0, nw - tw)
    else:
        top, left = (nh - th) // 2, (nw - tw) // 2
    cropped = resized.crop((left, top, left + tw, top + th))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).contiguous()
    return PreparedImage(pixels=pixels, original_size=(h, w), crop_top_left=(top, left))
