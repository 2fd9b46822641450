"""Loading an adapter for inference in ComfyUI: the file, then its projections in the dtype ComfyUI
would run a U-Net in on this machine (half the memory of the float32 training export on a GPU)."""

from __future__ import annotations

import os

import torch

import comfy.model_management as mm
import comfy.ops

from .adapter import LLMDiffAdapter
from .adapter_file import load_adapter
from .dtypes import DTYPES
from .errors import LLMDiffError

ADAPTER_DTYPES = ("auto", "fp16", "bf16", "fp32")


def inference_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """auto: fp16 where ComfyUI would run an SD U-Net in fp16 on `device` (its GPU by default), else bf16
    where it would use bf16, else float32 (CPU). fp16 is preferred over bf16 for the projections: their
    inputs are layer-normed, so fp16's extra mantissa bits cost no range."""
    if name != "auto":
        if name not in DTYPES:
            raise LLMDiffError(f"unknown adapter dtype '{name}': use one of {', '.join(ADAPTER_DTYPES)}")
        return DTYPES[name]
    device = device if device is not None else mm.get_torch_device()
    if mm.should_use_fp16(device):
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def load_for_inference(path: str | os.PathLike, dtype: str = "auto",
                       device: torch.device | None = None) -> LLMDiffAdapter:
    """The adapter file at `path` (validated, on the CPU; ComfyUI moves it with the U-Net), with its
    projections in inference_dtype(dtype, device).

    Its Linear layers are ComfyUI's (comfy.ops.disable_weight_init): when memory is short, ComfyUI
    loads the adapter partially and those layers fetch their weights to the GPU at call time, as the
    U-Net's do; plain torch layers would stay on the CPU and meet GPU inputs."""
    adapter = load_adapter(path, operations=comfy.ops.disable_weight_init)
    return adapter.cast_projections(inference_dtype(dtype, device)).eval().requires_grad_(False)
