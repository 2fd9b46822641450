"""The frozen encoders (VAE, LLM, CLIP) turned into training inputs, on the fly or for the cache.

Everything here is adapter-independent, which is what makes the feature cache possible: a
`Conditioning` computed now or read back from the cache is the same thing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..encoding import encode as llm_encode
from ..errors import LLMDiffError
from ..features import LLMFeatures, LLMSpec
from ..prompt_text import strip_prompt_weights

log = logging.getLogger("llmdiff.train")

POOLED_DIM = 1280  # SDXL's pooled CLIP-G width (SD1.5 ignores pooled_output)


@dataclass
class Conditioning:
    """A batch of samples after the frozen encoders (CPU, float32)."""

    keys: list[str]
    latents: torch.Tensor  # [B, 4, h, w] raw VAE latents (before process_latent_in)
    features: LLMFeatures | CompactFeatures  # [B, ...] padded to the token bucket, or compact (feature cache)
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
        self._truncated = 0  # captions cut by this process since take_truncated() last asked
        self._warned_truncation = False
        self.need_pooled = need_pooled
        if need_clip and clip is None:
            raise LLMDiffError("hybrid mode (--original-path clip) needs the base model's CLIP text encoder, but the "
                               "checkpoint has none: use a checkpoint that includes it, or --original-path llm")

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] 0..1 -> raw latents [B, 4, H/8, W/8]."""
        with torch.no_grad():
            return self.vae.encode(pixels).float().cpu()

    def captions(self, texts: list[str]) -> LLMFeatures:
        """The LLM features exactly as LLMDiffTextEncode makes them for the same text: ComfyUI's weighting
        syntax ((word:1.2), embedding:name) is CLIP's, so the LLM reads the plain words, as in the node; a
        caption typed into the node later gives what training saw. Long captions are truncated: counted in
        take_truncated(), with one warning at the first."""
        if self.llm is None:
            raise RuntimeError("the LLM is not loaded")
        cut: list[int] = []
        with torch.no_grad():
            features = llm_encode(self.llm, [strip_prompt_weights(t) for t in texts], max_tokens=self.max_tokens,
                                  overflow="truncate", truncated=cut)
        if cut and not self._warned_truncation:
            self._warned_truncation = True
            log.warning("captions longer than --max-tokens %d are truncated (the first: %r); how many is said when "
                        "the feature cache or the run is done. Raise --max-tokens to keep them whole",
                        self.max_tokens, texts[cut[0]][:60])
        self._truncated += len(cut)
        return features.to("cpu", torch.float32)

    def take_truncated(self) -> int:
        """How many captions were cut since the last call (each phase, the cache build or the run, says its own)."""
        n, self._truncated = self._truncated, 0
        return n

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


@dataclass
class CompactFeatures:
    """A batch of LLM features as the feature cache holds them: only the layers the adapter's encoding
    reads, in the stored dtype, padded only to the batch's longest caption (on the host; pinned when
    training on CUDA). `expand_features` turns them, on the device, into exactly the LLMFeatures the
    on-the-fly path gives (float32, the `max_tokens` bucket): ~10x fewer bytes to copy and to move.

    hidden: [B, len(layers), n, D]  the hidden states H_k for k in `layers` (no layers: [B, 0, n, D])
    scores: [B, L, n, D] or None    s_1..s_L when the encoding reads them
    mask:   [B, n] bool
    """

    spec: LLMSpec
    layers: tuple[int, ...]
    hidden: torch.Tensor
    scores: torch.Tensor | None
    mask: torch.Tensor
    max_tokens: int

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]

    def grown_to(self, n: int) -> CompactFeatures:
        """The same rows with room for n tokens (zero padding)."""
        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((*t.shape[:2], n, t.shape[3]))
            out[:, :, :t.shape[2]] = t
            return out
        mask = self.mask.new_zeros((self.batch_size, n))
        mask[:, :self.num_tokens] = self.mask
        return CompactFeatures(self.spec, self.layers, grow(self.hidden),
                               None if self.scores is None else grow(self.scores), mask, self.max_tokens)

    def set_row(self, i: int, hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> None:
        """Row i := one trimmed prompt (hidden [L+1, k, D], scores [L, k, D], mask [k]), in place."""
        k = mask.shape[0]
        if self.layers:
            self.hidden[i].zero_()
            self.hidden[i, :, :k] = hidden[list(self.layers)]
        if self.scores is not None:
            self.scores[i].zero_()
            self.scores[i, :, :k] = scores
        self.mask[i] = False
        self.mask[i, :k] = mask


def expand_features(spec: LLMSpec, hidden: torch.Tensor, scores: torch.Tensor | None, mask: torch.Tensor,
                    layers: tuple[int, ...], max_tokens: int) -> LLMFeatures:
    """CompactFeatures' tensors (on the device) -> LLMFeatures [B, L+1, T, D] float32 at the bucket T,
    as the on-the-fly path gives them: the same values wherever the encoding reads. Layers it does
    not read are a broadcast view, not memory (one stored layer: that layer, expanded; none: zeros)."""
    B, n = mask.shape
    L, D, T = spec.num_layers, spec.hidden_size, max_tokens
    dev = mask.device

    def padded(t: torch.Tensor) -> torch.Tensor:  # [B, k, n, D] any dtype -> [B, k, T, D] float32
        out = torch.empty((t.shape[0], t.shape[1], T, D), dtype=torch.float32, device=dev)
        out[:, :, :n] = t
        out[:, :, n:] = 0
        return out

    if not layers:
        h = torch.zeros((), device=dev).expand(B, L + 1, T, D)
    elif len(layers) == 1:
        h = padded(hidden).expand(B, L + 1, T, D)
    else:
        h = torch.zeros((B, L + 1, T, D), dtype=torch.float32, device=dev)
        h[:, list(layers), :n] = hidden.float()
    s = torch.zeros((), device=dev).expand(B, L, T, D) if scores is None else padded(scores)
    m = torch.zeros((B, T), dtype=torch.bool, device=dev)
    m[:, :n] = mask
    return LLMFeatures(spec, h, s, m)


def drop_captions(cond: Conditioning, drop: list[bool], empty: tuple[LLMFeatures, torch.Tensor | None,
                                                                       torch.Tensor | None]) -> Conditioning:
    """Rows with drop[i] get the empty prompt's features (and CLIP conditioning). The LLM features
    of the batch are replaced in place, row by row (they belong to this batch only)."""
    if not any(drop):
        return cond
    e_feat, e_clip, e_pooled = empty
    rows = [i for i, d in enumerate(drop) if d]
    features = cond.features
    if isinstance(features, CompactFeatures):
        eh, es, em = trim(e_feat, 0)
        if em.shape[0] > features.num_tokens:
            features = features.grown_to(em.shape[0])
        for i in rows:
            features.set_row(i, eh, es, em)
    else:  # encoded for this batch, padded to the run's bucket like the empty prompt (FrozenEncoders)
        if e_feat.num_tokens != features.num_tokens or e_feat.spec != features.spec:
            raise ValueError(f"the empty prompt's features ({e_feat.spec.describe()}, {e_feat.num_tokens} tokens) "
                             f"do not fit the batch's ({features.spec.describe()}, {features.num_tokens} tokens)")
        idx = torch.as_tensor(rows, dtype=torch.long)
        features.hidden[idx] = e_feat.hidden[:1].to(features.hidden.dtype)
        features.scores[idx] = e_feat.scores[:1].to(features.scores.dtype)
        features.mask[idx] = e_feat.mask[:1]
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
