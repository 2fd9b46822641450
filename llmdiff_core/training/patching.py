"""The adapter inside the frozen U-Net for training: the nodes' own patch code, in its training mode.

The patched model comes from comfy_patch.apply_adapter on the ModelPatcher that ComfyUI's checkpoint
loader returned, and the forward is BaseModel.apply_model with the same transformer_options, wrappers
and `llmdiff` keyword the sampler passes (comfy/sampler_helpers.py prepare_model_patcher merges the
patcher's wrappers into transformer_options; comfy/samplers.py calc_cond_batch calls apply_model).
So the trained layers are exactly the layers the nodes run.

What differs from sampling is asked for per call with adapter_runtime.TrainingCall (training_options):
the gates stay tensors, the score encoding adds its Langevin noise from each sample's seed, and c and
every site's K/V are computed by the call itself, outside gradient-checkpointed blocks. Validation
samples through the same patched model without it, i.e. exactly as the nodes do (with the U-Net eager:
uncompiled).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import comfy.patcher_extension as pe

from ..adapter import LLMDiffAdapter
from ..adapter_runtime import TrainingCall
from ..comfy_patch import apply_adapter, applied_runtimes
from ..conditioning import FeatureBatch, FeaturePart
from ..features import LLMFeatures
from ..model_wrappers import TRAINING_KEY


def patch_for_training(model_patcher: Any, adapter: LLMDiffAdapter) -> Any:
    """The patched ModelPatcher clone the training forward runs (strength 1, every block)."""
    return apply_adapter(model_patcher, adapter, strength=1.0)


def compile_unet(patched: Any, backend: str, mode: str | None = None, projections: bool = True,
                 image_sizes: int = 1) -> Callable[[], None]:
    """torch.compile the patched model's U-Net the way ComfyUI's TorchCompileModel node does: an
    APPLY_MODEL wrapper swaps the compiled module in for each call. The adapter's per-call work runs
    outside it (model_wrappers.ApplyModelWrapper) and its attention patches trace into the U-Net's graph,
    forward and backward. Of that per-call work, every site's K/V projection (the bulk of its ops: SDXL's
    70 sites, ~8 ops each and their backward) is compiled too (projections), as graphs of its own.

    image_sizes > 1 (aspect-ratio buckets): a static graph per size (dynamic=False; torch's default would make
    the sizes dynamic at the second one, slower per step), with dynamo's recompile limit raised by that many
    for the run. Returns what restores the limit."""
    import torch._dynamo.config as dynamo_config
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    set_torch_compile_wrapper(patched, backend=backend, mode=mode, dynamic=False if image_sizes > 1 else None)
    if projections:
        for runtime in applied_runtimes(patched):
            runtime.compile_training_projections(backend, mode)
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # (torch < 2.6)
    before = getattr(dynamo_config, name)
    setattr(dynamo_config, name, before + image_sizes - 1)
    return lambda: setattr(dynamo_config, name, before)


def uncompiled(patched: Any) -> Any:
    """A clone of the patched model (the same U-Net and adapter) without compile_unet's wrapper: its U-Net
    runs eager. Validation samples through it: a few images in inference mode at the sampler's batch would
    otherwise compile U-Net graphs of their own (minutes for SDXL, and their memory) for seconds of eager
    sampling, and the math is the same."""
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS

    clone = patched.clone()
    clone.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, COMPILE_KEY)  # (clone() copies the wrapper lists)
    clone.model_options.pop(TORCH_COMPILE_KWARGS, None)
    return clone


def training_options(patched: Any, call: TrainingCall) -> dict[str, Any]:
    """transformer_options for one training forward: as the sampler builds them (the patcher's
    model_options plus its wrappers and callbacks, comfy/sampler_helpers.py prepare_model_patcher),
    plus the TrainingCall that makes the U-Net call a training step."""
    to = pe.copy_nested_dicts(patched.model_options.get("transformer_options", {}))
    pe.merge_nested_dicts(to.setdefault("wrappers", {}), patched.wrappers, copy_dict1=False)
    pe.merge_nested_dicts(to.setdefault("callbacks", {}), patched.callbacks, copy_dict1=False)
    to[TRAINING_KEY] = call
    return to


def feature_batch(features: LLMFeatures) -> FeatureBatch:
    """The `llmdiff` keyword for one training batch (what CONDLLMDiff.concat gives the sampler)."""
    return FeatureBatch((FeaturePart(features, tuple(range(features.batch_size))),))


# --- gradient checkpointing ---------------------------------------------------------------------

def enable_gradient_checkpointing(unet: nn.Module) -> Callable[[], None]:
    """Recompute every ResBlock and transformer block in the backward pass; returns an undo function.

    The U-Net mutates one transformer_options dict as it walks its blocks ("block", "block_index"),
    so each checkpointed transformer block gets a snapshot of it: the recomputation must see the
    block it ran in, not the last block of the forward pass.
    """
    wrapped: list[nn.Module] = []
    for m in unet.modules():
        name = type(m).__name__
        if name == "BasicTransformerBlock":
            m.forward = functools.partial(_checkpointed_transformer_block, m.forward)  # type: ignore[method-assign]
        elif name == "ResBlock":
            m.forward = functools.partial(_checkpointed_resblock, m.forward)  # type: ignore[method-assign]
        else:
            continue
        wrapped.append(m)

    def undo() -> None:
        for m in wrapped:
            del m.forward  # back to the class's method
    return undo


def _checkpointed_transformer_block(forward: Callable, x: torch.Tensor, context: Any = None,
                                    transformer_options: dict[str, Any] | None = None) -> torch.Tensor:
    snapshot = dict(transformer_options or {})
    if not torch.is_grad_enabled():
        return forward(x, context=context, transformer_options=snapshot)
    return checkpoint(lambda a, b: forward(a, context=b, transformer_options=snapshot), x, context,
                      use_reentrant=False)


def _checkpointed_resblock(forward: Callable, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return forward(x, emb)
    return checkpoint(forward, x, emb, use_reentrant=False)
