"""Adapter-independent LLM features of a batch of prompts (DESIGN.md §1.1).

Everything here needs only the LLM: it is computed once per prompt, can be cached to disk for
training, and travels inside ComfyUI CONDITIONING. Everything learned lives in the adapter.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LLMSpec:
    """What an adapter must agree with about the LLM that produced its features."""

    family: str  # Hugging Face model_type: "llama", "qwen2", "gemma3_text", "gpt2", ...
    name: str  # folder or repo name, informative (a fine-tune of the same shape is allowed)
    hidden_size: int  # D
    num_layers: int  # T in the paper: number of decoder blocks

    def describe(self) -> str:
        return f"{self.name} ({self.family}, hidden size {self.hidden_size}, {self.num_layers} layers)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLMSpec:
        return cls(family=str(d["family"]), name=str(d["name"]),
                   hidden_size=int(d["hidden_size"]), num_layers=int(d["num_layers"]))


@dataclass
class LLMFeatures:
    """LLM features of B prompts, right-padded to one bucket length T (the encoder's max tokens).

    hidden: [B, L+1, T, D]  H_0 (token embeddings) .. H_L, block outputs before the final norm
    scores: [B, L, T, D]    s_l = H_l - B_l^0(H_{l-1}), the context's contribution of block l
    mask:   [B, T] bool     tokens that take part in attention (BOS and padding are False; an
                            empty prompt keeps its BOS so it still has one token)
    """

    spec: LLMSpec
    hidden: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        b, l1, t, d = self.hidden.shape
        if l1 != self.spec.num_layers + 1 or d != self.spec.hidden_size:
            raise ValueError(f"hidden {tuple(self.hidden.shape)} does not match {self.spec.describe()}")
        if tuple(self.scores.shape) != (b, l1 - 1, t, d):
            raise ValueError(f"scores {tuple(self.scores.shape)} do not match hidden {tuple(self.hidden.shape)}")
        if tuple(self.mask.shape) != (b, t) or self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{b}, {t}], got {self.mask.dtype} {tuple(self.mask.shape)}")

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[2]

    def select(self, rows: torch.Tensor | list[int]) -> LLMFeatures:
        """Rows in the given order (repeats allowed): batching, CFG, repeat-to-batch."""
        if isinstance(rows, (list, tuple, range)) and list(rows) == list(range(self.batch_size)):
            # every row in order: the same tensors (no copy of [B, L+1, T, D])
            return LLMFeatures(self.spec, self.hidden, self.scores, self.mask)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        return LLMFeatures(self.spec, _take_rows(self.hidden, idx), _take_rows(self.scores, idx),
                           self.mask[idx.to(self.mask.device)])

    def first_tokens(self, n: int) -> LLMFeatures:
        """The first n token positions (views, no copy): an adapter reads only the attended span, so the
        tokens after it need not be encoded at all (adapter_runtime.AdapterRuntime._build_entry)."""
        if not 1 <= n <= self.num_tokens:
            raise ValueError(f"first_tokens({n}) of features with {self.num_tokens} tokens")
        if n == self.num_tokens:
            return self
        return LLMFeatures(self.spec, self.hidden[:, :, :n], self.scores[:, :, :n], self.mask[:, :n])

    def reading(self, layers: list[int], scores: bool) -> LLMFeatures:
        """A view in which only `layers` of hidden (and the scores, if `scores`) hold their values: the
        rest is a broadcast (stride-0) of one slice, so select / cat / to copy and move only what an
        encoding reads (AdapterConfig.features_read): an 8B LLM's row is ~140 MB in float32, score
        encoding reads half of it. The unread positions hold other positions' values: never read them."""
        hidden, all_scores = self.hidden, self.scores
        if len(layers) == 1:
            hidden = hidden[:, layers[0]:layers[0] + 1].expand(hidden.shape)
        elif not layers:
            hidden = hidden[:, :1, :1, :1].expand(hidden.shape)
        if not scores:
            all_scores = all_scores[:, :1, :1, :1].expand(all_scores.shape)
        return LLMFeatures(self.spec, hidden, all_scores, self.mask)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LLMFeatures:
        return LLMFeatures(self.spec, _broadcast_to(self.hidden, device, dtype),
                           _broadcast_to(self.scores, device, dtype), self.mask.to(device=device))

    @staticmethod
    def cat(parts: list[LLMFeatures]) -> LLMFeatures:
        first = parts[0]
        for p in parts[1:]:
            if p.spec != first.spec or p.num_tokens != first.num_tokens:
                raise ValueError("cannot batch LLM features of different LLMs or token buckets")
        if len(parts) == 1:
            return LLMFeatures(first.spec, first.hidden, first.scores, first.mask)
        return LLMFeatures(first.spec, _cat_rows([p.hidden for p in parts]),
                           _cat_rows([p.scores for p in parts]), torch.cat([p.mask for p in parts]))


# Broadcast (stride-0) dimensions: a layer or token axis that holds one value for all its positions
# (e.g. the training step's features, where layers the encoding never reads are an expanded view
# instead of zeros in memory) stays a view through select / cat / to instead of being materialised.

def _broadcast_dims(t: torch.Tensor) -> list[int]:
    return [d for d in range(1, t.dim()) if t.stride(d) == 0 and t.shape[d] > 1]


def _base(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    for d in dims:
        t = t.narrow(d, 0, 1)
    return t


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """What t holds in memory: t without its broadcast axes (each cut to one position); t itself if it has
    none. `stored_values(t).expand(t.shape)` is t again, so moving this moves all of t."""
    return _base(t, _broadcast_dims(t))


def _take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    dims = _broadcast_dims(t)
    if not dims:
        return t[idx]
    base = _base(t, dims)[idx]
    return base.expand(idx.shape[0], *t.shape[1:])


def _broadcast_to(t: torch.Tensor, device: Any, dtype: torch.dtype | None) -> torch.Tensor:
    dims = _broadcast_dims(t)
    if not dims:
        return moved(t, device, dtype)
    return moved(_base(t, dims), device, dtype).expand(t.shape)


def moved(t: torch.Tensor, device: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t.to(device, dtype). From pageable host memory to a CUDA device, through a page-locked staging copy moved
    asynchronously (where stages() says so): a copy from pageable memory ran at ~7 GB/s on an H100 and an H200, and
    an 8B prompt pair's features took 9.3 ms that way against 4.3 ms staged (H200, docs/benchmarks.md §5i). The
    staging block comes from torch's caching host allocator, which reuses it only once the copy that read it is
    done; the copy is ordered before later work on the current stream, like any other. Where page-locked memory
    cannot be had (a platform's limit: WSL caps it), the plain copy."""
    target = t.device if device is None else torch.device(device)
    if stages(t, target, dtype):
        if not t.is_pinned():
            try:
                t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
            except RuntimeError:
                return t.to(target)
        return t.to(target, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def stages(t: torch.Tensor, target: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether moved() takes t to `target` from page-locked memory: host to CUDA, no cast, something to move, and
    ComfyUI (where it is loaded) pins memory on this machine (not with --disable-pinned-memory, nor on GPUs it
    does not pin for)."""
    if not (target.type == "cuda" and t.device.type == "cpu" and dtype in (None, t.dtype) and t.numel()):
        return False
    comfy_memory = sys.modules.get("comfy.model_management")  # (not imported here: the core runs without ComfyUI)
    return getattr(comfy_memory, "MAX_PINNED_MEMORY", 1) > 0


def _cat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    dims = _broadcast_dims(ts[0])
    if dims and all(_broadcast_dims(t) == dims for t in ts[1:]):
        base = torch.cat([_base(t, dims) for t in ts])
        return base.expand(base.shape[0], *ts[0].shape[1:])
    return torch.cat(ts)
