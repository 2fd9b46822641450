"""LLM features inside ComfyUI CONDITIONING (DESIGN.md §3, comfyui-internals.md §4).

Each conditioning entry carries `entry[1]["model_conds"]["llmdiff"] = CONDLLMDiff(features)`.
ComfyUI batches model_conds per sampling call and hands the result to the U-Net forward as the
keyword `llmdiff`; the Apply patch's APPLY_MODEL wrapper takes it from there. Entries without
the key (a negative from plain CLIPTextEncode) run as their own forward, and the patch leaves them
alone (hybrid mode).

The features stay where the encoder put them (CPU / intermediate device): a batch is only row
indices into the prompt's own LLMFeatures objects, so identity survives from step to step and the
patch can compute everything derived from them once per sampling run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import comfy.conds
import torch

from .errors import LLMDiffError
from .features import LLMFeatures

COND_KEY = "llmdiff"


@dataclass(frozen=True)
class FeaturePart:
    """Rows of one prompt batch's features, in the order the sampler put them."""

    features: LLMFeatures
    rows: tuple[int, ...]


class FeatureBatch:
    """What the U-Net forward receives as `llmdiff=`: the parts of one batched call, not yet copied.

    Deliberately no `.dtype` and not a list: BaseModel._apply_model then passes it through as is
    instead of casting (and copying) the big feature tensors to the U-Net on every step.
    """

    def __init__(self, parts: tuple[FeaturePart, ...]) -> None:
        self.parts = parts

    @property
    def num_rows(self) -> int:
        return sum(len(p.rows) for p in self.parts)

    def same_rows(self, other: FeatureBatch) -> bool:
        """Same feature objects (identity, not value) and the same row layout."""
        return len(self.parts) == len(other.parts) and all(
            a.features is b.features and a.rows == b.rows for a, b in zip(self.parts, other.parts))

    def materialize(self) -> LLMFeatures:
        """One LLMFeatures with every row of the call, on the features' own device."""
        return LLMFeatures.cat([p.features.select(list(p.rows)) for p in self.parts])

    def distinct(self, read: tuple[list[int], bool] | None = None, tokens: int | None = None,
                 device: torch.device | None = None) -> tuple[LLMFeatures, list[int]]:
        """(the distinct rows of the call, for each row of the call its index among them).

        A latent batch of N with one prompt repeats that prompt's row N times (process_cond): what is
        computed from the features (c, every site's K/V) is then computed once and indexed, and only the
        distinct rows are copied and moved to the U-Net's device. With `read` (AdapterConfig.features_read)
        only what the encoding reads is copied (LLMFeatures.reading); with `tokens` only the first `tokens`
        positions (the attended span's end, from distinct_mask); with `device` each part's rows are moved
        there before they are joined. So the host copies only each part's cut (nothing, for rows that are
        whole and contiguous) and never joins the rows: a host join of an 8B prompt pair over the 128-token
        bucket is 66 MiB written into a fresh allocation, then copied again to be moved (docs/benchmarks.md §3n).
        """
        rows_of_part, index = self._distinct_rows()
        parts = []
        for part, rows in zip(self.parts, rows_of_part):
            if not rows:
                continue
            view = part.features if read is None else part.features.reading(*read)
            view = (view if tokens is None else view.first_tokens(tokens)).select(rows)
            parts.append(view if device is None else view.to(device))
        return LLMFeatures.cat(parts), index

    def distinct_mask(self) -> tuple[torch.Tensor, list[int]]:
        """The key mask [R, T] of the rows distinct() gives and its index, without touching the features: it
        decides the attended span, and with it how many tokens distinct() needs to copy."""
        rows_of_part, index = self._distinct_rows()
        masks = [p.features.mask[list(rows)] for p, rows in zip(self.parts, rows_of_part) if rows]
        return torch.cat(masks), index

    def _distinct_rows(self) -> tuple[list[list[int]], list[int]]:
        """(per part, the rows it contributes to the distinct rows; for each row of the call, its index among
        them). Distinct rows are numbered part by part, so joining the parts' selections keeps that order."""
        first: dict[tuple[int, int], int] = {}  # (features object, row) -> its place among the distinct rows
        rows_of_part: list[list[int]] = [[] for _ in self.parts]
        index = []
        for p, part in enumerate(self.parts):
            for row in part.rows:
                key = (id(part.features), row)
                if key not in first:
                    first[key] = len(first)
                    rows_of_part[p].append(row)
                index.append(first[key])
        return rows_of_part, index


class CONDLLMDiff(comfy.conds.CONDRegular):
    """A COND whose .cond is an LLMFeatures object (not a tensor); see the module docstring."""

    def __init__(self, cond: LLMFeatures, rows: tuple[int, ...] | None = None) -> None:
        super().__init__(cond)
        self.rows = tuple(range(cond.batch_size)) if rows is None else rows

    def process_cond(self, batch_size: int, **kwargs: Any) -> CONDLLMDiff:
        # Like comfy.utils.repeat_to_batch_size: tile the prompts, then cut to the latent batch.
        n = len(self.rows)
        return CONDLLMDiff(self.cond, tuple(self.rows[i % n] for i in range(batch_size)))

    def can_concat(self, other: Any) -> bool:
        # Different LLMs or token buckets cannot share one attention call: ComfyUI then runs
        # the conds as separate forwards, which is correct.
        return (isinstance(other, CONDLLMDiff) and other.cond.spec == self.cond.spec
                and other.cond.num_tokens == self.cond.num_tokens
                and other.cond.hidden.device == self.cond.hidden.device)

    def concat(self, others: list[CONDLLMDiff]) -> FeatureBatch:
        return FeatureBatch(tuple(FeaturePart(c.cond, c.rows) for c in [self, *others]))

    def size(self) -> list[int]:
        """Logical [B, T, D] for ComfyUI's memory estimates."""
        return [len(self.rows), self.cond.num_tokens, self.cond.spec.hidden_size]


def attach_features(conditioning: list[list[Any]], features: LLMFeatures) -> list[list[Any]]:
    """A new CONDITIONING whose entries carry `features`; the input is not modified.

    Rows must match the conditioning tensors: either the entries' batches add up to the features'
    batch (rows are split over the entries in order), or every entry has the features' batch
    (each entry gets all of them).
    """
    if not conditioning:
        raise LLMDiffError("attach_features got an empty CONDITIONING")
    batches = [int(entry[0].shape[0]) for entry in conditioning]
    if sum(batches) == features.batch_size:
        starts = [sum(batches[:i]) for i in range(len(batches))]
        parts = [features.select(list(range(s, s + b))) if b != features.batch_size else features
                 for s, b in zip(starts, batches)]
    elif all(b == features.batch_size for b in batches):
        parts = [features] * len(batches)
    else:
        raise LLMDiffError(f"the conditioning has {'+'.join(map(str, batches))} rows but the LLM features "
                           f"have {features.batch_size}: encode the same prompts with both")
    out = []
    for entry, part in zip(conditioning, parts):
        d = dict(entry[1])
        model_conds = dict(d.get("model_conds", {}))
        model_conds[COND_KEY] = CONDLLMDiff(part)
        d["model_conds"] = model_conds
        out.append([entry[0], d])
    return out
