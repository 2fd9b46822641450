"""Does an adapter fit the MODEL, the LLM and the text features it is used with? (DESIGN.md §2)

A mismatch is refused with an AdapterMismatchError that names both sides in words and says what
to load instead. An LLM of the same shape but another name or family is only warned about: a
fine-tune of the adapter's LLM is a legitimate choice.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import AdapterConfig, SiteSpec
from .errors import AdapterMismatchError
from .features import LLMSpec
from .unet_sites import base_family, describe_sites, find_sites

log = logging.getLogger("llmdiff")

_MODEL_ADVICE = "Load the base model the adapter was made for, or an adapter for this model."


def _base_model(model_patcher_or_model: Any) -> Any:
    """A comfy BaseModel from a ModelPatcher (its .model) or from the BaseModel itself."""
    inner = getattr(model_patcher_or_model, "model", None)
    return inner if hasattr(inner, "diffusion_model") else model_patcher_or_model


def _model_sites(model: Any) -> list[SiteSpec] | None:
    """The U-Net's cross-attention sites; None for a model that is no SD-style U-Net (Flux, SD3...)."""
    unet = getattr(model, "diffusion_model", None)
    if unet is None or not hasattr(unet, "input_blocks"):
        return None
    return find_sites(unet)[0]


def _describe_site(i: int, s: SiteSpec) -> str:
    return (f"layer {i} ({s.block[0]} block {s.block[1]}, transformer block {s.block_index}): query width "
            f"{s.query_dim}, {s.heads} heads x {s.dim_head}, context width {s.context_dim}")


def _first_difference(ours: list[SiteSpec], theirs: list[SiteSpec]) -> str:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"first difference at {_describe_site(i, a)} in the adapter, but {_describe_site(i, b)} in the MODEL"
    return f"the adapter has {len(ours)} cross-attention layers, the MODEL {len(theirs)}"


def check_adapter_matches_model(config: AdapterConfig, model_patcher_or_model: Any) -> None:
    """Refuse an adapter whose base family or per-layer dims differ from the MODEL's U-Net."""
    model = _base_model(model_patcher_or_model)
    family = base_family(model)
    sites = _model_sites(model)
    adapter_side = describe_sites(config.base, config.sites)
    if sites is None or not sites:
        raise AdapterMismatchError(
            f"This adapter was trained for {adapter_side}, but the MODEL is a {type(model).__name__} model "
            f"without SD-style cross-attention layers. {_MODEL_ADVICE}")
    model_side = describe_sites(family, sites)
    if family != config.base:
        raise AdapterMismatchError(
            f"This adapter was trained for {adapter_side}, but the MODEL is {model_side}. {_MODEL_ADVICE}")
    if sites != config.sites:
        raise AdapterMismatchError(
            f"This adapter was trained for {adapter_side}, but the MODEL is {model_side} with different "
            f"cross-attention layers: {_first_difference(config.sites, sites)}. The MODEL may be a pruned "
            f"or distilled variant or another architecture of the same family. {_MODEL_ADVICE}")


def _check_llm(config: AdapterConfig, spec: LLMSpec, refusal: str, advice: str) -> str | None:
    """Shared rule: the shape must match (error); name and family should (warning, returned)."""
    trained = config.llm
    if (spec.hidden_size, spec.num_layers) != (trained.hidden_size, trained.num_layers):
        raise AdapterMismatchError(f"{refusal.format(given=spec.describe(), trained=trained.describe())} {advice}")
    if (spec.family, spec.name) == (trained.family, trained.name):
        return None
    warning = (f"This adapter was trained with the LLM {trained.describe()}, and is used with "
               f"{spec.describe()}: same shape, so it runs, but unless that is a fine-tune of the "
               f"adapter's LLM the results will be poor.")
    log.warning("LLMDiff: %s", warning)
    return warning


def check_adapter_matches_llm(config: AdapterConfig, llm_spec: LLMSpec) -> str | None:
    """Refuse an LLM of another shape; warn about (and return) another name/family of the same shape."""
    return _check_llm(
        config, llm_spec,
        "This adapter was trained with the LLM {trained}, but the LLM given is {given}.",
        "Load the LLM the adapter was made for, or an adapter trained for this LLM.")


def check_features_match(config: AdapterConfig, features_spec: LLMSpec) -> str | None:
    """Same rule for text features encoded earlier (CONDITIONING, a feature cache) with some LLM."""
    return _check_llm(
        config, features_spec,
        "These text features were encoded with the LLM {given}, but this adapter was trained with {trained}.",
        "Encode the prompt with the adapter's LLM (LLMDiffTextEncode), or use an adapter trained for that LLM.")
