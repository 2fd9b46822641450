"""Validation images: fixed prompts sampled through ComfyUI's own sampler (comfy.sample.sample),
with the adapter (the patched model, as LLMDiffApply makes it) and without it (the base model with
plain CLIP conditioning), side by side in a grid: one row per prompt, columns [base | adapter].

The prompts are encoded once at the start of the run (the LLM may not stay loaded when training
from the feature cache); conditioning is built exactly as LLMDiffTextEncode builds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..conditioning import attach_features
from .buckets import LATENT_SCALE
from .encoders import POOLED_DIM, FrozenEncoders

log = logging.getLogger("llmdiff.train")


@dataclass
class PromptConds:
    prompt: str
    adapter_pos: list
    adapter_neg: list
    base_pos: list | None  # None when the base model cannot run alone (no CLIP)
    base_neg: list | None


def _clip_cond(encoders: FrozenEncoders, text: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if encoders.clip is None:
        return None
    with torch.no_grad():
        c, p = encoders.clip.encode_from_tokens(encoders.clip.tokenize(text), return_pooled=True)
    return c.float().cpu(), (p.float().cpu() if p is not None else torch.zeros(1, POOLED_DIM))


def _llmdiff_cond(encoders: FrozenEncoders, text: str) -> list:
    features = encoders.captions([text])
    clip = _clip_cond(encoders, text)
    if clip is None:  # the node's placeholder when no CLIP is connected (paper mode only)
        clip = (torch.zeros(1, 1, 1), torch.zeros(1, POOLED_DIM))
    return attach_features([[clip[0], {"pooled_output": clip[1]}]], features)


def prepare(encoders: FrozenEncoders, prompts: list[str], negative: str) -> list[PromptConds]:
    out = []
    neg = _llmdiff_cond(encoders, negative)
    base_neg_c = _clip_cond(encoders, negative)
    base_neg = [[base_neg_c[0], {"pooled_output": base_neg_c[1]}]] if base_neg_c else None
    for p in prompts:
        base = _clip_cond(encoders, p)
        out.append(PromptConds(p, _llmdiff_cond(encoders, p), neg,
                               [[base[0], {"pooled_output": base[1]}]] if base else None, base_neg))
    return out


def _sample(model: Any, vae: Any, pos: list, neg: list, size: tuple[int, int], steps: int, cfg: float, sampler: str,
            scheduler: str, seed: int) -> np.ndarray:
    import comfy.sample

    latent = torch.zeros(1, 4, size[0] // LATENT_SCALE, size[1] // LATENT_SCALE)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    image = vae.decode(samples)  # [1, H, W, 3] 0..1
    return (image[0].clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)


def render(base_model: Any, patched: Any, vae: Any, conds: list[PromptConds], size: tuple[int, int], steps: int,
           cfg: float, sampler: str, scheduler: str, seed: int) -> np.ndarray:
    """The grid [rows = prompts, columns = base | adapter] as uint8 [H, W, 3]; size: each image's (height, width)."""
    rows = []
    with torch.no_grad():
        for pc in conds:
            cells = []
            if pc.base_pos is not None:
                cells.append(_sample(base_model, vae, pc.base_pos, pc.base_neg, size, steps, cfg, sampler, scheduler,
                                     seed))
            cells.append(_sample(patched, vae, pc.adapter_pos, pc.adapter_neg, size, steps, cfg, sampler, scheduler,
                                 seed))
            rows.append(np.concatenate(cells, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


def save_grid(grid: np.ndarray, folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.png"
    Image.fromarray(grid).save(path)
    return path
