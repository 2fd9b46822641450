"""Tiny random-weight ComfyUI U-Nets with the real SD1.5 / SDXL block layout, and adapters for them.

Shared test factory. The U-Nets keep the depth lists of the real models (so the cross-attention
sites and their transformer_options keys are the real ones: SD1.5 16 sites, SDXL 70) and shrink
only the widths, so they build and run in seconds on CPU.

Each builder is cached per process and returns a fresh ModelPatcher.clone(): patches added by one
test never reach another. Clones share the weights themselves: never modify them in place.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from llmdiff_core.adapter import LLMDiffAdapter
from llmdiff_core.config import AdapterConfig
from llmdiff_core.features import LLMSpec
from llmdiff_core.unet_sites import base_family, find_sites
from seeded_weights import seeded_init

SD15_CONTEXT_DIM = 64
SDXL_CONTEXT_DIM = 80
SDXL_ADM_DIM = 2816  # the real one: pooled CLIP-G 1280 + 6 size/crop embeddings of 256
WEIGHT_SEED = 1234

# From comfy/model_detection.py unet_config_from_diffusers_unet, widths shrunk, depth lists kept.
# transformer_depth_output is consumed from the end by UNetModel (output block 0 pops the last item).
_SD15_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": SD15_CONTEXT_DIM, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
_SDXL_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": SDXL_ADM_DIM, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": SDXL_CONTEXT_DIM, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# 2 levels, one transformer each: sites input 1, input 3, middle 0, output 0..3 (7 in all).
_SD15_MINIMAL_CONFIG: dict[str, Any] = {
    **_SD15_CONFIG, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
}


class _TinySDXL(comfy.supported_models.SDXL):
    # SDXL's own extra config forces 64 channels per head: 0 heads at these widths.
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


def _build(config_cls: type, unet_config: dict[str, Any], dtype: torch.dtype = torch.float32,
           compute_dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    model_config = config_cls(dict(unet_config, dtype=dtype))
    model_config.set_inference_dtype(dtype, compute_dtype)
    device = comfy.model_management.unet_offload_device()
    model = model_config.get_model({}, "", device=device)
    seeded_init(model.diffusion_model, WEIGHT_SEED)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


@functools.lru_cache(maxsize=None)
def _sd15(dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    return _build(comfy.supported_models.SD15, _SD15_CONFIG, dtype)


@functools.lru_cache(maxsize=None)
def _sdxl() -> comfy.model_patcher.ModelPatcher:
    return _build(_TinySDXL, _SDXL_CONFIG)


@functools.lru_cache(maxsize=None)
def _sd15_minimal() -> comfy.model_patcher.ModelPatcher:
    return _build(comfy.supported_models.SD15, _SD15_MINIMAL_CONFIG)


def tiny_sd15(dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """SD1.5 layout: 16 sites, context width 64, 8 heads (as SD1.5), float32 (or dtype) on CPU."""
    return _sd15(dtype).clone()


def tiny_sdxl() -> comfy.model_patcher.ModelPatcher:
    """SDXL layout: 70 sites, context width 80, 16 channels per head, ADM input 2816."""
    return _sdxl().clone()


def tiny_sd15_minimal() -> comfy.model_patcher.ModelPatcher:
    """2-level SD1.x U-Net (7 sites): the fastest one for sampling tests."""
    return _sd15_minimal().clone()


def tiny_sd15_minimal_stored_in(storage: torch.dtype) -> tuple[Any, Any]:
    """The minimal U-Net stored in `storage` and computed in float32, as ComfyUI runs a model loaded with
    weight_dtype fp8_e4m3fn (its comfy.ops layers cast each weight per call: manual cast), and a float32 copy
    holding the same rounded weights (the reference). Both fresh: the cached models stay untouched."""
    stored = _build(comfy.supported_models.SD15, _SD15_MINIMAL_CONFIG, storage, compute_dtype=torch.float32)
    reference = _build(comfy.supported_models.SD15, _SD15_MINIMAL_CONFIG)
    rounded = {k: v.to(storage) if v.is_floating_point() else v
               for k, v in reference.model.diffusion_model.state_dict().items()}
    stored.model.diffusion_model.load_state_dict(rounded)
    reference.model.diffusion_model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                     for k, v in rounded.items()})
    return stored, reference


def tiny_llm_spec(hidden_size: int = 32, num_layers: int = 4, family: str = "llama",
                  name: str = "tiny-llama") -> LLMSpec:
    return LLMSpec(family=family, name=name, hidden_size=hidden_size, num_layers=num_layers)


def make_adapter_config(model_patcher: Any, llm_spec: LLMSpec, **overrides: Any) -> AdapterConfig:
    """The AdapterConfig a training run on this model + LLM would write; fields overridable."""
    fields: dict[str, Any] = {"base": base_family(model_patcher.model),
                              "sites": find_sites(model_patcher.model.diffusion_model)[0], "llm": llm_spec}
    fields.update(overrides)
    return AdapterConfig(**fields)


def make_adapter(config: AdapterConfig, seed: int = 0, trained: bool = False,
                 model_patcher: Any = None) -> LLMDiffAdapter:
    """A float32 adapter, deterministic in `seed`.

    trained=False: a fresh adapter (tau_q copied from the U-Net when model_patcher is given).
    trained=True: every parameter random and every gate non-zero, so the new path changes outputs.
    """
    adapter = LLMDiffAdapter(config)
    query_weights = None
    if model_patcher is not None:
        query_weights = [m.to_q.weight for m in find_sites(model_patcher.model.diffusion_model)[1]]
    with torch.random.fork_rng(devices=[]):  # reset_parameters draws from the global RNG
        torch.manual_seed(seed)
        adapter.reset_parameters(query_weights)
    if trained:
        _randomise_trained(adapter, seed)
    return adapter


def _randomise_trained(adapter: LLMDiffAdapter, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(adapter.sites)
    enc = adapter.encoder
    with torch.no_grad():
        for p in (enc.gate, enc.norm.weight, enc.norm.bias):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        enc.rho.copy_(-3.0 + torch.randn(enc.rho.shape, generator=gen))
        adapter.a_orig.copy_(0.5 + torch.rand(n, generator=gen))
        adapter.a_new.copy_(0.2 + torch.rand(n, generator=gen))  # >= 0.2: never zero
        adapter.b_orig.copy_(0.3 * torch.randn(n, generator=gen))
        adapter.b_new.copy_(0.3 * torch.randn(n, generator=gen))
        for proj in (adapter.phi, adapter.phi_pool):
            if proj is not None:
                proj.bias.copy_(0.1 * torch.randn(proj.bias.shape, generator=gen))
