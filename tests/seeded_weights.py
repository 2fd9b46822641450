"""Seeded, variance-preserving random weights for the tiny test models (no ComfyUI import)."""

from __future__ import annotations

import torch


def seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values on every parameter.

    comfy ops skip weight init (weights start as uninitialised memory) and SD zero-initialises its
    output convs and proj_out: with those zeros the output would not depend on the context at all.
    A private generator keeps the global RNG untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:  # Linear / Conv weights: variance-preserving scale
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # norm scales near 1
                p.copy_(1.0 + 0.1 * noise)
            else:  # biases
                p.copy_(0.05 * noise)
