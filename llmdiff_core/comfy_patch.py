"""LLMDiff in a ComfyUI MODEL: apply_adapter() patches every cross-attention site (DESIGN.md §1.2, §3).

Wiring (comfyui-internals.md §3-§4):
- The adapter lives in its own ModelPatcher, registered as an additional model, so ComfyUI's model
  management loads and offloads it with the U-Net.
- An APPLY_MODEL wrapper takes the `llmdiff` keyword (a FeatureBatch, conditioning.py) off the
  model call and puts a per-call state into transformer_options, where the attention patches read it.
  In paper mode it also swaps the U-Net context for phi(c) and (SDXL) the pooled part of y. It runs
  outside `diffusion_model`, so a torch.compile'd U-Net (TorchCompileModel) traces only the patches.
- An OUTER_SAMPLE wrapper brackets each sampling run: what is constant over a run (c, phi(c), the
  pooled vector, every site's K/V) is computed at the first U-Net call and reused by every step; in hybrid
  mode also by the next run with the same prompts while the adapter's weights stay the same (run_cache.py),
  until ComfyUI unloads the model (an ON_DETACH callback).
- Training (training/patching.py) runs the same patches: a TrainingCall in transformer_options makes
  one U-Net call a training step (gates as tensors, Langevin noise, nothing cached). See
  adapter_runtime.TrainingCall.
- hybrid (original_path "clip"): composable patches, so other packs' attention patches (IP-Adapter)
  keep working: an attn2_patch computes w_new*A_new, ComfyUI's attention-core hook
  (transformer_options["optimized_attention_override"], chained) adds it to w_orig*A_orig before the
  site's own to_out, so the output projection runs once; at a site another pack's replace patch
  occupies, the replace's output is fused the same way (FusedReplace); an attn2_output_patch fuses
  after to_out only where neither happened (a ComfyUI without the hook). With a fused site kernel
  (fused_site.py, opt-in) the attn2_patch only leaves the site's input waiting, and the core hook runs the
  new path and the fusion in one kernel.
  paper (original_path "llm"): attn2 replace patches.

Where each part lives: run_entry.py (what a run and a call compute before the U-Net runs),
adapter_runtime.py (one applied adapter: builds the entries, runs a site's new path), site_patches.py (the
attention patches), model_wrappers.py (the APPLY_MODEL, OUTER_SAMPLE and ON_DETACH callables); this module
binds the sites and puts them all on a ModelPatcher clone.

Patch objects deep-copy to themselves (ComfyUI 0.3.75 deep-copies model_options on every clone; a
copy would duplicate the U-Net and the adapter) and have no .to(): the adapter moves as a model.
"""

from __future__ import annotations

import comfy.patcher_extension
from comfy.model_patcher import ModelPatcher

from . import fused_site
from .adapter import LLMDiffAdapter
from .adapter_runtime import AdapterRuntime, SiteBinding
from .errors import LLMDiffError
from .model_wrappers import ApplyModelWrapper, ForgetKeptRuns, OuterSampleWrapper
from .site_patches import HybridFusion, HybridNewPath, PaperAttention, PaperInput
from .unet_sites import find_sites
from .validation import check_adapter_matches_model

WRAPPER_KEY = "llmdiff"  # the key of every wrapper, callback and additional model apply_adapter adds


def _bind_sites(model_patcher: ModelPatcher, adapter: LLMDiffAdapter,
                block_weights: dict[int, float] | None) -> list[SiteBinding]:
    """The adapter's sites, in order, with the model's attn2 modules (validated to be the same sites)."""
    check_adapter_matches_model(adapter.config, model_patcher)
    _, modules = find_sites(model_patcher.model.diffusion_model)
    weights = dict(block_weights or {})
    known = {s.transformer_index for s in adapter.config.sites}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise LLMDiffError(f"block weights for layers {unknown}, but this model has layers 0..{max(known)}")
    return [SiteBinding(spec, attn2, float(weights.get(spec.transformer_index, 1.0)))
            for spec, attn2 in zip(adapter.config.sites, modules)]


def _adapter_patcher(adapter: LLMDiffAdapter, model_patcher: ModelPatcher) -> ModelPatcher:
    """A clone of the adapter's one base ModelPatcher, kept on the adapter.

    ComfyUI tracks loaded models by patcher; when a clone is dropped it falls back to the parent.
    A parentless patcher per apply would leave a dead entry for a live module after every re-apply,
    which ComfyUI reports as a leak and answers with a full garbage collection on every load.
    """
    base = adapter.__dict__.get("_llmdiff_patcher")
    if base is None or (base.load_device, base.offload_device) != (model_patcher.load_device,
                                                                   model_patcher.offload_device):
        base = ModelPatcher(adapter, load_device=model_patcher.load_device, offload_device=model_patcher.offload_device)
        adapter.__dict__["_llmdiff_patcher"] = base
    return base.clone()


def _refuse_replaced_sites(model_patcher: ModelPatcher, sites: list[SiteBinding]) -> None:
    replaced = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for s in sites:
        for key in (s.spec.key, s.spec.block):
            if key in replaced:
                raise LLMDiffError(
                    f"Another patch (IP-Adapter or similar) already replaces the cross-attention at {key}. A "
                    f"paper-mode LLMDiff adapter takes over cross-attention and cannot be combined with it: "
                    f"use a hybrid (clip-mode) LLMDiff adapter together with IP-Adapter.")


def applied_runtimes(model_patcher: ModelPatcher) -> list[AdapterRuntime]:
    """The runtimes of the adapters apply_adapter put on this model, in stack order."""
    return [w.runtime for w in model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)]


def forget_kept_entries(model_patcher: ModelPatcher) -> None:
    """Drop what the adapters applied to this model keep for their next run (run_cache.py): that run builds its
    entries, as a run with new prompts does."""
    for runtime in applied_runtimes(model_patcher):
        runtime.runs.forget()


def apply_adapter(model_patcher: ModelPatcher, adapter: LLMDiffAdapter, strength: float = 1.0,
                  start_percent: float = 0.0, end_percent: float = 1.0,
                  block_weights: dict[int, float] | None = None, site_kernel: str | None = None) -> ModelPatcher:
    """A clone of `model_patcher` (a comfy ModelPatcher) with the adapter in every cross-attention layer.

    strength scales the adapter (0 = the unpatched model in hybrid mode); it acts while
    start_percent <= sampling progress <= end_percent. block_weights maps transformer_index
    (SD1.5 0..15, SDXL 0..10) to a multiplier of strength; missing layers use 1. site_kernel (hybrid
    sampling): "torch" (three kernels per site), "fused" (fused_site.py, one Triton kernel where it applies),
    "fused-attention" (tau_q's GEMM, then the attention and the fusion in one kernel) or "auto" (fused-attention
    for a run whose U-Net replays inductor's CUDA graphs, else torch: fused_site.kernel_for_run); default
    $LLMDIFF_SITE_KERNEL, else "auto".
    """
    sites = _bind_sites(model_patcher, adapter, block_weights)
    m = model_patcher.clone()
    stacked = m.get_additional_models_with_key(WRAPPER_KEY)
    runtime = AdapterRuntime(adapter, sites, strength, start_percent, end_percent,
                             m.get_model_object("model_sampling"), stack_position=len(stacked),
                             site_kernel=fused_site.site_kernel_setting(site_kernel))
    m.set_additional_models(WRAPPER_KEY, stacked + [_adapter_patcher(adapter, m)])
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, ApplyModelWrapper(runtime))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, OuterSampleWrapper(runtime))
    on_detach = getattr(comfy.patcher_extension.CallbacksMP, "ON_DETACH", None)
    if on_detach is not None:  # (a ComfyUI without it: the kept entries go when the next run replaces them)
        m.add_callback_with_key(on_detach, WRAPPER_KEY, ForgetKeptRuns(runtime))
    if runtime.paper:
        _refuse_replaced_sites(m, sites)
        m.set_model_attn2_patch(PaperInput(runtime))
        replace = PaperAttention(runtime)
        for s in sites:
            m.set_model_attn2_replace(replace, s.spec.block[0], s.spec.block[1], s.spec.block_index)
    else:
        m.set_model_attn2_patch(HybridNewPath(runtime))
        m.set_model_attn2_output_patch(HybridFusion(runtime))
    return m
