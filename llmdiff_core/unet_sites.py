"""The cross-attention sites (attn2 layers) of a ComfyUI SD1.5 / SDXL U-Net, in forward order.

Site i of an adapter is the i-th attn2 that a U-Net forward pass reaches. Keys are the ones ComfyUI
puts in transformer_options: block = ("input" | "middle" | "output", id), block_index inside the
SpatialTransformer, transformer_index = running SpatialTransformer count.
Works on a comfy UNetModel (model.model.diffusion_model) by walking modules; needs no ComfyUI import.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import SiteSpec


def _spatial_transformers(block: nn.Module) -> list[nn.Module]:
    return [m for m in block if hasattr(m, "transformer_blocks")] if isinstance(block, nn.Sequential) else []


def find_sites(unet: Any) -> tuple[list[SiteSpec], list[nn.Module]]:
    """(site specs, the attn2 modules themselves) in forward order."""
    groups = [("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)]
    specs: list[SiteSpec] = []
    modules: list[nn.Module] = []
    transformer_index = 0
    for name, blocks in groups:
        for block_id, block in enumerate(blocks):
            for st in _spatial_transformers(block):
                for block_index, tb in enumerate(st.transformer_blocks):
                    attn2 = tb.attn2
                    specs.append(SiteSpec(
                        block=(name, block_id), block_index=block_index, transformer_index=transformer_index,
                        query_dim=attn2.to_q.in_features, heads=attn2.heads, dim_head=attn2.dim_head,
                        context_dim=attn2.to_k.in_features))
                    modules.append(attn2)
                transformer_index += 1
    return specs, modules


KNOWN_FAMILIES = {"SD15": "sd15", "SDXL": "sdxl"}


def base_family(model: Any) -> str:
    """'sd15' or 'sdxl' for a comfy BaseModel (model_patcher.model), from its model config class
    (SD15 / SDXL in comfy.supported_models); anything else (SD2.x, SD3, ...) gets its own name and is
    refused by the validation."""
    config_cls = type(getattr(model, "model_config", model))
    for cls in config_cls.__mro__:  # subclasses (SSD-1B, test configs) keep their parent's family;
        if cls.__name__ in KNOWN_FAMILIES:  # their layer layout is checked site by site anyway
            return KNOWN_FAMILIES[cls.__name__]
    return config_cls.__name__.lower()


FAMILY_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL", "sd20": "SD2.x", "sd21unclipl": "SD2.1 unCLIP"}


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)


def describe_sites(family: str, sites: list[SiteSpec]) -> str:
    ctx = sorted({s.context_dim for s in sites})
    return f"{family_label(family)} ({len(sites)} cross-attention layers, context width {'/'.join(map(str, ctx))})"
