"""The frozen encoders (VAE, LLM, CLIP) turned into training inputs, on the fly or for the cache.

Everything here is adapter-independent, which is what makes the feature cache possible: a
`Conditioning` computed now or read back from the cache is the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..encoding import encode as llm_encode
from ..errors import LLMDiffError
from ..features import LLMFeatures

POOLED_DIM = 1280  # SDXL's pooled CLIP-G width (SD1.5 ignores pooled_output)


@dataclass
class Conditioning:
    """A batch of samples after the frozen encoders (CPU, float32)."""

    keys: list[str]
    latents: torch.Tensor  # [B, 4, h, w] raw VAE latents (before process_latent_in)
    features: LLMFeatures  # [B, ...] padded to the token bucket
    clip: torch.Tensor | None  # [B, 77k, C] CLIP conditioning (hybrid mode), else None
    pooled: torch.Tensor | None  # [B, 1280] CLIP pooled (SDXL hybrid), else None
    sizes: list[tuple[int, int, int, int]]  # (orig_h, orig_w, crop_top, crop_left) for SDXL


def repeat_to_common_length(conds: list[torch.Tensor]) -> torch.Tensor:
    """Stack CLIP conditionings of 77, 154, ... tokens: repeat each to the least common multiple
    (ComfyUI's own trick for batching; unmasked attention over repeated tokens is unchanged)."""
    length = math.lcm(*(c.shape[-2] for c in conds))
    return torch.stack([c.repeat(length // c.shape[-2], 1) for c in conds])


class FrozenEncoders:
    """VAE + LLM (+ CLIP) for one base model; every output on CPU in float32."""

    def __init__(self, vae: Any, llm: Any, clip: Any, max_tokens: int, need_clip: bool, need_pooled: bool) -> None:
        self.vae = vae
        self.llm = llm  # llmdiff_core.llm.LoadedLLM, or None when training only from the cache
        self.clip = clip
        self.max_tokens = max_tokens
        self.need_clip = need_clip
        self.need_pooled = need_pooled
        if need_clip and clip is None:
            raise LLMDiffError("hybrid mode (--original-path clip) needs the base model's CLIP text encoder, but the "
                               "checkpoint has none: use a checkpoint that includes it, or --original-path llm")

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] 0..1 -> raw latents [B, 4, H/8, W/8]."""
        with torch.no_grad():
            return self.vae.encode(pixels).float().cpu()

    def captions(self, texts: list[str]) -> LLMFeatures:
        """The LLM features exactly as LLMDiffTextEncode makes them (long captions are truncated)."""
        if self.llm is None:
            raise RuntimeError("the LLM is not loaded")
        with torch.no_grad():
            return llm_encode(self.llm, texts, max_tokens=self.max_tokens, overflow="truncate").to("cpu", torch.float32)

    def clip_texts(self, texts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(CLIP conditioning [B, 77k, C] or None, pooled [B, 1280] or None)."""
        if not (self.need_clip or (self.need_pooled and self.clip is not None)):
            return None, None
        conds, pooled = [], []
        with torch.no_grad():
            for text in texts:
                c, p = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
                conds.append(c[0].float().cpu())
                pooled.append(p[0].float().cpu() if p is not None else torch.zeros(POOLED_DIM))
        return (repeat_to_common_length(conds) if self.need_clip else None,
                torch.stack(pooled) if self.need_pooled else None)

    def encode(self, keys: list[str], pixels: torch.Tensor, captions: list[str],
               sizes: list[tuple[int, int, int, int]]) -> Conditioning:
        clip, pooled = self.clip_texts(captions)
        return Conditioning(keys=keys, latents=self.images(pixels), features=self.captions(captions),
                            clip=clip, pooled=pooled, sizes=sizes)

    def empty_prompt(self) -> tuple[LLMFeatures, torch.Tensor | None, torch.Tensor | None]:
        """The empty prompt through the same path a negative "" takes in the nodes."""
        clip, pooled = self.clip_texts([""])
        return self.captions([""]), clip, pooled


def drop_captions(cond: Conditioning, drop: list[bool], empty: tuple[LLMFeatures, torch.Tensor | None,
                                                                       torch.Tensor | None]) -> Conditioning:
    """Rows with drop[i] get the empty prompt's features (and CLIP conditioning)."""
    if not any(drop):
        return cond
    e_feat, e_clip, e_pooled = empty
    rows = [e_feat if d else cond.features.select([i]) for i, d in enumerate(drop)]
    features = LLMFeatures.cat([r if r.batch_size == 1 else r.select([0]) for r in rows])
    clip = cond.clip
    if clip is not None and e_clip is not None:
        parts = [e_clip[0] if d else clip[i] for i, d in enumerate(drop)]
        clip = repeat_to_common_length(parts)
    pooled = cond.pooled
    if pooled is not None and e_pooled is not None:
        pooled = torch.stack([e_pooled[0] if d else pooled[i] for i, d in enumerate(drop)])
    return Conditioning(cond.keys, cond.latents, features, clip, pooled, cond.sizes)


def trim(features: LLMFeatures, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [L+1, n, D], scores [L, n, D], mask [n]) of one row without its padding (n >= 1):
    what the cache stores. `pad` below restores the bucket; padding is zero either way."""
    m = features.mask[row]
    idx = torch.nonzero(m).flatten()
    n = int(idx[-1]) + 1 if idx.numel() else 1
    return features.hidden[row, :, :n], features.scores[row, :, :n], m[:n]


def pad(spec: Any, hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> LLMFeatures:
    n = mask.shape[0]
    h = hidden.new_zeros((1, hidden.shape[0], max_tokens, hidden.shape[2]), dtype=torch.float32)
    s = scores.new_zeros((1, scores.shape[0], max_tokens, scores.shape[2]), dtype=torch.float32)
    mk = torch.zeros(1, max_tokens, dtype=torch.bool)
    h[0, :, :n] = hidden.float()
    s[0, :, :n] = scores.float()
    mk[0, :n] = mask
    return LLMFeatures(spec=spec, hidden=h, scores=s, mask=mk)
