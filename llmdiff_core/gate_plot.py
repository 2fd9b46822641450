"""The per-layer fusion weights as a picture (the paper's Figure 5), drawn with PIL only.

Top: w_orig and w_new per U-Net cross-attention layer. Bottom: g_l per LLM block (the layer-wise
score weights), so a user sees which LLM layers the adapter listens to.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .adapter import LLMDiffAdapter

ORIG_COLOR = (66, 133, 244)
NEW_COLOR = (234, 67, 53)
GATE_COLOR = (52, 168, 83)
AXIS_COLOR = (60, 60, 60)
GRID_COLOR = (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _bars(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: list[tuple[list[float], tuple]],
          title: str, xlabel: str, font: ImageFont.ImageFont) -> None:
    left, top, right, bottom = box
    values = [v for s, _ in series for v in s]
    vmin, vmax = min(0.0, *values), max(0.0, *values)
    if vmax - vmin < 1e-9:
        vmax = vmin + 1.0
    span = vmax - vmin

    def y_of(v: float) -> float:
        return bottom - (v - vmin) / span * (bottom - top)

    draw.text((left, top - 26), title, fill=AXIS_COLOR, font=font)
    for frac in np.linspace(0, 1, 5):
        v = vmin + frac * span
        y = y_of(v)
        draw.line([(left, y), (right, y)], fill=GRID_COLOR)
        draw.text((left - 58, y - 8), f"{v:.3g}", fill=AXIS_COLOR, font=font)
    n = len(series[0][0])
    slot = (right - left) / max(n, 1)
    width = max(slot * 0.8 / len(series), 1.0)
    for k, (vals, color) in enumerate(series):
        for i, v in enumerate(vals):
            x0 = left + i * slot + slot * 0.1 + k * width
            y0, y1 = sorted((y_of(0.0), y_of(v)))
            draw.rectangle([x0, y0, x0 + width - 1, max(y1, y0 + 1)], fill=color)
    draw.line([(left, y_of(0.0)), (right, y_of(0.0))], fill=AXIS_COLOR, width=2)
    step = max(1, n // 16)
    for i in range(0, n, step):
        draw.text((left + i * slot + slot * 0.3, bottom + 4), str(i), fill=AXIS_COLOR, font=font)
    draw.text(((left + right) // 2 - 120, bottom + 24), xlabel, fill=AXIS_COLOR, font=font)


def plot_gates(adapter: LLMDiffAdapter, width: int = 1024, height: int = 768) -> Image.Image:
    w_orig, w_new = (t.detach().float().cpu().tolist() for t in adapter.gate_weights())
    g = adapter.encoder.gate.detach().float().cpu().tolist()
    cfg = adapter.config
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(16)
    mid = height // 2
    _bars(draw, (80, 60, width - 30, mid - 50), [(w_orig, ORIG_COLOR), (w_new, NEW_COLOR)],
          f"{cfg.base.upper()} cross-attention fusion weights ({cfg.original_path} mode)",
          "cross-attention layer (forward order)", font)
    draw.rectangle([width - 250, 20, width - 236, 34], fill=ORIG_COLOR)
    draw.text((width - 230, 18), "w_orig = a1*exp(b1)", fill=AXIS_COLOR, font=font)
    draw.rectangle([width - 250, 40, width - 236, 54], fill=NEW_COLOR)
    draw.text((width - 230, 38), "w_new = a2*exp(b2)", fill=AXIS_COLOR, font=font)
    _bars(draw, (80, mid + 50, width - 30, height - 50), [(g, GATE_COLOR)],
          f"score weights g_l per LLM block ({cfg.llm.name}, encoding: {cfg.encoding})",
          "LLM block l", font)
    return img


def image_to_comfy(img: Image.Image):
    """PIL RGB -> ComfyUI IMAGE tensor [1, H, W, 3] float in 0..1."""
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
