"""The diffusion objective with the base model's own noise schedule (DESIGN.md §1.3).

ComfyUI's SD1.5 / SDXL models sample in the k-diffusion form x_t = x_0 + sigma * eps (noise_scaling),
and BaseModel.apply_model returns the *denoised* x_0 estimate for any prediction type (it applies
calculate_input / calculate_denoised of the model's own model_sampling). We therefore go through
apply_model, exactly like the sampler, and express the usual losses in x_0 space:

    epsilon models: |eps_hat - eps|^2 = |x0_hat - x0|^2 / sigma^2        = snr       * |x0_hat - x0|^2
    v models:       |v_hat - v|^2     = |x0_hat - x0|^2 / (1 - alpha_bar) = (snr + 1) * |x0_hat - x0|^2
    (snr = alpha_bar / (1 - alpha_bar) = 1 / sigma^2)

These are identities, so the loss *is* the standard epsilon / v MSE. Min-SNR-gamma (Hang et al. 2023)
multiplies the epsilon loss by min(snr, gamma) / snr and the v loss by min(snr, gamma) / (snr + 1),
which in x_0 space is min(snr, gamma) for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LLMDiffError


@dataclass
class NoiseDraw:
    """Per-sample random draws, each from the sample's own seed (see data.sample_seed)."""

    timesteps: torch.Tensor  # [B] long, 0..num_timesteps-1
    noise: torch.Tensor  # like the latents
    drop_caption: list[bool]
    encoder_seeds: list[int]  # for the adapter's Langevin noise


def prediction_type(model: Any) -> str:
    """'eps' or 'v' from a comfy BaseModel's model_type; anything else is refused."""
    name = getattr(getattr(model, "model_type", None), "name", "")
    if name == "EPS":
        return "eps"
    if name in ("V_PREDICTION",):
        return "v"
    raise LLMDiffError(f"the base model's prediction type is {name or 'unknown'}; LLMDiff training supports "
                       f"epsilon and v-prediction SD1.5 / SDXL models")


def num_timesteps(model_sampling: Any) -> int:
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is None:
        raise LLMDiffError("the base model has no discrete noise schedule (sigmas): not an SD1.5 / SDXL model")
    return int(sigmas.shape[0])


def draw(seeds: list[int], latent_shape: tuple[int, ...], n_timesteps: int, caption_dropout: float,
         noise_offset: float = 0.0) -> NoiseDraw:
    """Everything random about one sample, from its seed alone (so it does not depend on which
    process or micro-batch the sample lands in)."""
    ts, noises, drops, enc = [], [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        ts.append(int(torch.randint(0, n_timesteps, (1,), generator=g)))
        n = torch.randn(latent_shape, generator=g)
        if noise_offset:
            n = n + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=g)
        noises.append(n)
        drops.append(bool(torch.rand((), generator=g) < caption_dropout))
        enc.append(int(torch.randint(0, 2**62, (1,), generator=g)))
    return NoiseDraw(torch.tensor(ts, dtype=torch.long), torch.stack(noises), drops, enc)


def loss_weights(sigma: torch.Tensor, prediction: str, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Per-sample weights turning |x0_hat - x0|^2 into the epsilon / v loss (see the module doc)."""
    snr = 1.0 / sigma.double().pow(2)
    if min_snr_gamma > 0:
        w = torch.clamp(snr, max=min_snr_gamma)
    else:
        w = snr if prediction == "eps" else snr + 1.0
    return w.float()


def diffusion_loss(x0_hat: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, prediction: str,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Per-sample loss [B] (mean over latent elements)."""
    err = (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(dim=1)
    return loss_weights(sigma.to(err.device), prediction, min_snr_gamma) * err
