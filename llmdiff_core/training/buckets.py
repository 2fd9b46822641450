"""Aspect-ratio buckets: training images keep (about) their own shape instead of a square crop.

Square centre crops cut off what a caption names near the long edges, and SDXL's size conditioning
was made for images of many shapes (its target size is the bucket's). Each image goes to the bucket
whose aspect ratio is nearest its own, is resized to cover it and cropped to it; a micro-batch holds
images of one bucket (a batch is one tensor). The buckets are sizes in multiples of `step` pixels
with at most resolution² pixels, from square out to `max_ratio` : 1 either way, e.g. SDXL at 1024
with step 64 and ratio 2: 1024x1024, 1088x960, ... 1408x704 and their transposes (13 sizes).
"""

from __future__ import annotations

import math

Size = tuple[int, int]  # (height, width) in pixels, as the image tensors are laid out
LATENT_SCALE = 8  # pixels per latent cell of the SD1.5 / SDXL VAE


def bucket_sizes(resolution: int, step: int, max_ratio: float) -> tuple[Size, ...]:
    """Every bucket: for each width from the resolution up, the tallest height (a multiple of step) that keeps
    the area within resolution², while the long side is at most max_ratio times the short one; with the
    transposes. Sorted from square out, landscape before portrait (a fixed order: it decides ties in
    nearest_bucket)."""
    sizes: set[Size] = set()
    width = resolution
    while True:
        height = resolution * resolution // width // step * step
        if height < step or width > max_ratio * height:
            break
        sizes.update({(height, width), (width, height)})
        width += step
    return tuple(sorted(sizes, key=lambda s: (round(abs(math.log(s[1] / s[0])), 9), s[1] < s[0], s)))


def nearest_bucket(height: int, width: int, buckets: tuple[Size, ...]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (on a log scale: 2:1 and 1:2 are as far from 1:1)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda s: abs(math.log(s[1] / s[0]) - aspect))


def describe(buckets: tuple[Size, ...], counts: dict[Size, int] | None = None) -> str:
    """'1024x1024, 1088x960, ...' (width x height), with each one's count of images when given."""
    return ", ".join(f"{w}x{h}" + (f": {counts.get((h, w), 0)}" if counts is not None else "") for h, w in buckets)
