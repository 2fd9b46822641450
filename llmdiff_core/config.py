"""Adapter configuration: what an adapter file promises about its base model and its LLM.

The config is stored as JSON in the safetensors metadata (adapter_file.py) and validated against
the MODEL and the LLM an adapter is used with.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import LLMDiffError
from .features import LLMSpec

FORMAT_NAME = "llmdiff-adapter"
FORMAT_VERSION = 1

ENCODINGS_FIXED = ("score", "last", "mean")  # plus "layer:k", 0 <= k <= L
ORIGINAL_PATH_MODES = ("llm", "clip")  # llm = the paper (CLIP unused); clip = hybrid
C0_MODES = ("embeddings", "zeros")
BASE_FAMILIES = ("sd15", "sdxl")
SDXL_POOLED_DIM = 1280


@dataclass(frozen=True)
class SiteSpec:
    """One U-Net cross-attention layer (attn2) as ComfyUI's patches name it."""

    block: tuple[str, int]  # ("input" | "middle" | "output", block id): transformer_options["block"]
    block_index: int  # index inside the SpatialTransformer: transformer_options["block_index"]
    transformer_index: int  # running SpatialTransformer count (SD1.5 0..15, SDXL 0..10)
    query_dim: int  # U-Net feature width at this layer
    heads: int
    dim_head: int
    context_dim: int  # width of the original cross-attention context (768 SD1.5, 2048 SDXL)

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block[0], self.block[1], self.block_index)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block"] = list(self.block)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiteSpec:
        return cls(block=(str(d["block"][0]), int(d["block"][1])), block_index=int(d["block_index"]),
                   transformer_index=int(d["transformer_index"]), query_dim=int(d["query_dim"]),
                   heads=int(d["heads"]), dim_head=int(d["dim_head"]), context_dim=int(d["context_dim"]))


def parse_encoding(encoding: str, num_layers: int) -> tuple[str, int | None]:
    """'score' | 'last' | 'mean' | 'layer:k' -> (mode, k). Raises LLMDiffError on anything else."""
    if encoding in ENCODINGS_FIXED:
        return encoding, None
    m = re.fullmatch(r"layer:(-?\d+)", encoding)
    if m:
        k = int(m.group(1))
        if k < 0:
            k += num_layers + 1
        if 0 <= k <= num_layers:
            return "layer", k
        raise LLMDiffError(f"encoding '{encoding}': layer index out of range 0..{num_layers} for this LLM")
    raise LLMDiffError(f"unknown encoding '{encoding}': use score, last, mean or layer:k")


@dataclass
class AdapterConfig:
    base: str  # "sd15" | "sdxl"
    sites: list[SiteSpec]
    llm: LLMSpec
    encoding: str = "score"
    original_path: str = "clip"
    c0: str = "embeddings"
    gate_init: float = 1.0  # g_l at init (see adapter.py for the choice)
    rho_init: float = -9.0  # h_l = softplus(rho_l) ~ 1.2e-4 at init: a whisper of Langevin noise
    max_tokens: int = 128  # token bucket the adapter was trained with (informative)
    training: dict[str, Any] = field(default_factory=dict)  # summary: steps, data, lr, ...

    def __post_init__(self) -> None:
        if self.base not in BASE_FAMILIES:
            raise LLMDiffError(f"unknown base model family '{self.base}': expected one of {BASE_FAMILIES}")
        if self.original_path not in ORIGINAL_PATH_MODES:
            raise LLMDiffError(f"unknown original_path '{self.original_path}': expected llm or clip")
        if self.c0 not in C0_MODES:
            raise LLMDiffError(f"unknown c0 '{self.c0}': expected embeddings or zeros")
        if not self.sites:
            raise LLMDiffError("an adapter needs at least one cross-attention site")
        parse_encoding(self.encoding, self.llm.num_layers)

    @property
    def context_dim(self) -> int:
        return self.sites[0].context_dim

    @property
    def needs_pooled(self) -> bool:
        """SDXL in paper mode also replaces CLIP's pooled vector with phi_pool(mean c)."""
        return self.original_path == "llm" and self.base == "sdxl"

    def features_read(self) -> tuple[list[int], bool]:
        """(the hidden-state indices, whether the scores) the encoding reads: what the training cache stores
        and what a sampling run moves to the U-Net's device."""
        mode, k = parse_encoding(self.encoding, self.llm.num_layers)
        L = self.llm.num_layers
        if mode == "score":
            return ([0] if self.c0 == "embeddings" else []), True
        if mode == "last":
            return [L], False
        if mode == "mean":
            return list(range(1, L + 1)), False
        return [int(k)], False  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "base": self.base,
            "sites": [s.to_dict() for s in self.sites], "llm": self.llm.to_dict(),
            "encoding": self.encoding, "original_path": self.original_path, "c0": self.c0,
            "gate_init": self.gate_init, "rho_init": self.rho_init, "max_tokens": self.max_tokens,
            "training": self.training,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        d = json.loads(text)
        if d.get("format") != FORMAT_NAME:
            raise LLMDiffError(f"not an LLMDiff adapter config (format is {d.get('format')!r})")
        if int(d.get("version", 0)) > FORMAT_VERSION:
            raise LLMDiffError(f"adapter format version {d['version']} is newer than this pack supports "
                               f"({FORMAT_VERSION}): update ComfyUI-LLMDiff")
        return cls(base=d["base"], sites=[SiteSpec.from_dict(s) for s in d["sites"]],
                   llm=LLMSpec.from_dict(d["llm"]), encoding=d.get("encoding", "score"),
                   original_path=d.get("original_path", "clip"), c0=d.get("c0", "embeddings"),
                   gate_init=float(d.get("gate_init", 1.0)), rho_init=float(d.get("rho_init", -9.0)),
                   max_tokens=int(d.get("max_tokens", 128)), training=dict(d.get("training", {})))
