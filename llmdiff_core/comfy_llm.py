"""A Hugging Face LLM living under ComfyUI's model management (the LLMDIFF_LLM socket value).

ComfyUI moves the model to the GPU for encoding; by default it is offloaded right afterwards, so an
8B LLM and an SDXL U-Net never share the GPU. Needs ComfyUI; imported by the nodes only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .features import LLMFeatures, LLMSpec

log = logging.getLogger("llmdiff")


class _HFHolder(nn.Module):
    """ModelPatcher assigns attributes such as `device` on its model; HF models make `device` a
    read-only property, so the HF model sits one level down."""

    def __init__(self, hf: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.hf = hf
        self._dtype = dtype

    def get_dtype(self) -> torch.dtype:
        return self._dtype


def pick_devices(device: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device). 'default' = ComfyUI's compute device; 'cpu' forces CPU."""
    import comfy.model_management as mm

    offload = mm.text_encoder_offload_device()
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    return mm.get_torch_device(), offload


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Like llm.choose_dtype, but 'auto' on a GPU asks ComfyUI (it honours --bf16/--fp16 flags and
    knows which cards do bf16 well)."""
    import comfy.model_management as mm

    from .llm import choose_dtype

    if choice != "auto" or device.type == "cpu":
        return choose_dtype(choice, device)
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


@dataclass
class ManagedLLM:
    """What flows through an LLMDIFF_LLM socket."""

    loaded: Any  # llmdiff_core.llm.LoadedLLM
    patcher: Any  # comfy.model_patcher.ModelPatcher around _HFHolder
    folder: str
    # False: offload right after each encode (lowest peak). True: leave it to ComfyUI, which keeps it
    # loaded until something needs the room (no reload when only the prompt changes, on a large card).
    keep_loaded: bool = False

    @property
    def spec(self) -> LLMSpec:
        return self.loaded.spec

    def encode(self, texts: list[str], max_tokens: int, overflow: str) -> LLMFeatures:
        """Load to the compute device through ComfyUI, encode, return features on the
        intermediate device (CPU unless --gpu-only) in float32."""
        import comfy.model_management as mm

        from .encoding import encode

        # force_full_load: plain HF Linear layers cannot be partially loaded (lowvram) like comfy ops.
        mm.load_models_gpu([self.patcher], force_full_load=True)
        try:
            features = encode(self.loaded, texts, max_tokens=max_tokens, overflow=overflow)
            return features.to(mm.intermediate_device(), torch.float32)
        finally:
            if not self.keep_loaded:
                release(self.patcher)


def release(patcher: Any) -> None:
    """Unload `patcher` from ComfyUI's loaded models now (weights back to its offload device).

    ComfyUI would keep the LLM on the GPU until something else needs the room, so an 8B LLM (16 GB
    in bf16) would sit beside the U-Net during sampling. Encodings are cached by ComfyUI's node
    cache, so only a changed prompt pays for the reload."""
    import comfy.model_management as mm

    for i, loaded in enumerate(mm.current_loaded_models):
        if loaded.model is patcher:
            if loaded.model_unload():
                mm.current_loaded_models.pop(i)
                mm.soft_empty_cache()
            return


AFTER_ENCODING = ("offload", "keep")


def load_managed_llm(path: str, folder: str, dtype: str = "auto", device: str = "default",
                     trust_remote_code: bool = False, after_encoding: str = "offload") -> ManagedLLM:
    import comfy.model_patcher

    from .llm import load_llm

    load_device, offload_device = pick_devices(device)
    torch_dtype = pick_dtype(dtype, load_device)
    loaded = load_llm(path, dtype=torch_dtype, device=offload_device, trust_remote_code=trust_remote_code)
    holder = _HFHolder(loaded.model, torch_dtype)
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)
    log.info("LLMDiff: loaded %s as %s on %s (offload %s)", loaded.spec.describe(), torch_dtype,
             load_device, offload_device)
    return ManagedLLM(loaded=loaded, patcher=patcher, folder=folder, keep_loaded=after_encoding == "keep")
