"""The model-level wrappers around a patched U-Net (comfy_patch.py's wiring).

ApplyModelWrapper (APPLY_MODEL): one U-Net call's CallState into transformer_options, the attention-core hook,
paper mode's context; OuterSampleWrapper (OUTER_SAMPLE): brackets a sampling run; ForgetKeptRuns (ON_DETACH):
drops the kept run entries when ComfyUI unloads the model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .adapter_runtime import AdapterRuntime, SharedOnCopy
from .conditioning import COND_KEY
from .config import SDXL_POOLED_DIM
from .run_entry import RunEntry
from .site_patches import CoreFusion, FusedReplace

COMPILE_KWARGS_KEY = "torch_compile_kwargs"  # model_options: comfy_api.torch_helpers' compile wrapper's arguments
FEATURES_KEY = "llmdiff_features"  # transformer_options: the FeatureBatch of the current U-Net call
TRAINING_KEY = "llmdiff_training"  # transformer_options: a TrainingCall makes the U-Net call a training step
OVERRIDE_KEY = "optimized_attention_override"  # transformer_options: ComfyUI's hook at the attention core


def _unet_dtype(base_model: Any) -> torch.dtype:
    """The dtype BaseModel._apply_model runs the U-Net in (its manual-cast dtype, else the weights')."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


class ApplyModelWrapper(SharedOnCopy):
    """An APPLY_MODEL wrapper: moves the `llmdiff` keyword into transformer_options as this adapter's
    per-call state, and in paper mode puts phi(c) and phi_pool in place of CLIP's context and pooled.

    It runs around BaseModel._apply_model, i.e. outside the diffusion model: when ComfyUI's
    TorchCompileModel compiles `diffusion_model`, this Python (feature lookup, the once-per-run
    entry with its host syncs) stays eager and the compiled U-Net sees only tensors and the patches.
    """

    def __init__(self, runtime: AdapterRuntime) -> None:
        self.runtime = runtime

    def __call__(self, executor: Callable, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                 c_crossattn: torch.Tensor | None = None, control: Any = None,
                 transformer_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        rt = self.runtime
        transformer_options = transformer_options or {}
        # An outer LLMDiff wrapper (a stacked adapter) may already have taken the keyword.
        batch = kwargs.pop(COND_KEY, None) or transformer_options.get(FEATURES_KEY)
        to = {**transformer_options, FEATURES_KEY: batch}  # the U-Net writes into it: keep ours apart
        unet_dtype, training = _unet_dtype(executor.class_obj), to.get(TRAINING_KEY)
        state = None
        if batch is not None:
            replaced = to.get("patches_replace", {}).get("attn2")
            state = rt.call_state(batch, x.shape[0], x.device, unet_dtype, to.get("sigmas"), training, replaced)
        elif rt.paper:
            raise rt.missing_features_error(to)
        to[rt.state_key] = state
        if state is not None and not rt.paper and state.any_new_path():
            if any(state.at_core):
                to[OVERRIDE_KEY] = CoreFusion(rt, state, to.get(OVERRIDE_KEY))
            if replaced:  # fuse at the replace patch's output, before to_out, as at the core
                to["patches_replace"] = {**to["patches_replace"],
                                         "attn2": {k: FusedReplace(rt, state, p) for k, p in replaced.items()}}
        if rt.paper:
            c_crossattn, y = _paper_unet_inputs(state.entry, kwargs.get("y"))
            if y is not None:
                kwargs["y"] = y
        elif c_crossattn is not None and c_crossattn.shape[-1] != rt.config.context_dim:
            raise rt.no_clip_error(c_crossattn.shape[-1])
        if training is not None and unet_autocast_off(x.device.type, unet_dtype):
            with torch.autocast(x.device.type, enabled=False):
                return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)


def unet_autocast_off(device_type: str, unet_dtype: torch.dtype) -> bool:
    """Whether a training call runs the U-Net (the frozen base model and the sites) outside the
    trainer's autocast: when the U-Net already computes in the autocast dtype. Autocast would then
    only add fp32 islands: on CUDA it runs every GroupNorm / LayerNorm in fp32, casting the
    activations (and the norm weights) up and back down around each, forward and backward (~750
    casts per SD1.5 step, a fifth of its device time on an H200: docs/benchmarks.md §5d). Without it
    the frozen U-Net computes exactly as when sampling (ComfyUI runs it without autocast); the
    adapter's encoding, c and the sites' K/V stay under autocast (computed above), and the sites cast
    explicitly to the U-Net dtype. A U-Net kept in fp32 under bf16/fp16 autocast stays under it."""
    return (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == unet_dtype)  # (no autocast on e.g. meta: FLOP counts)


def _paper_unet_inputs(entry: RunEntry, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Paper mode: the U-Net context and (SDXL) y with phi(c) and phi_pool in place of CLIP's."""
    if entry.pooled is not None and y is not None:
        y = torch.cat([entry.pooled.to(y), y[:, SDXL_POOLED_DIM:]], dim=1)
    return entry.context, y


class ForgetKeptRuns(SharedOnCopy):
    """ON_DETACH: when ComfyUI unloads the model, the entries kept for the next run (device tensors outside its
    model management) go too.

    Only a detach that unpatches the weights is an unload (model_management.free_memory, unload_all_models).
    ComfyUI also detaches a patcher without unpatching when a clone of it takes its place in the loaded models
    (every sampling run loads its own clone) and when a clone is garbage-collected; the model stays loaded."""

    def __init__(self, runtime: AdapterRuntime) -> None:
        self.runtime = runtime

    def __call__(self, model_patcher: Any, unpatch_all: bool = True) -> None:
        if unpatch_all:
            self.runtime.runs.forget()


class OuterSampleWrapper(SharedOnCopy):
    """Starts and ends the per-run cache around one sampling run."""

    def __init__(self, runtime: AdapterRuntime) -> None:
        self.runtime = runtime

    def __call__(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        patcher = executor.class_obj.model_patcher  # (the guider's)
        self.runtime.begin_run(patcher.get_model_object("model_sampling"),
                               patcher.model_options.get(COMPILE_KWARGS_KEY))
        try:
            return executor(*args, **kwargs)
        finally:
            self.runtime.end_run()  # keeps its entries for the next run (hybrid), or frees them
