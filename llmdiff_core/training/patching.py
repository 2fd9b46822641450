"""The adapter inside the frozen U-Net for training: the nodes' own patch code, made trainable.

The patched model comes from comfy_patch.apply_adapter on the ModelPatcher that ComfyUI's checkpoint
loader returned, and the forward is BaseModel.apply_model with the same transformer_options, wrappers
and `llmdiff` keyword the sampler passes (comfy/sampler_helpers.py prepare_model_patcher merges the
patcher's wrappers into transformer_options; comfy/samplers.py calc_cond_batch calls apply_model).
So the trained layers are exactly the layers the nodes run.

Three things differ from sampling, and apply_adapter has no switch for them yet, so the runtime's
per-call entry builder is overridden on this one runtime instance (see TrainableRuntime):
- the gates w_orig / w_new stay tensors (the runtime turns them into python floats for speed, which
  would cut their gradients; attention.py accepts tensors);
- the score encoding adds its Langevin noise sqrt(2 h_l) eps, drawn per sample from the sample's seed;
- every site's K/V is computed up front, outside gradient-checkpointed blocks, so a recomputation in
  the backward pass finds them and saves nothing new.
The per-run cache needs nothing: outside a sampling run (no OUTER_SAMPLE wrapper) the runtime
recomputes every call, and a validation run opens and closes its own cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import comfy.patcher_extension as pe

from ..adapter import LLMDiffAdapter
from ..attention import KeyMask
from ..comfy_patch import WRAPPER_KEY, AdapterRuntime, DiffusionModelWrapper, RunEntry, apply_adapter
from ..conditioning import FeatureBatch, FeaturePart
from ..features import LLMFeatures
from ..validation import check_features_match


@dataclass
class TrainingHooks:
    """What the next U-Net call should do differently from inference (set by the training step)."""

    langevin_noise: bool = False
    row_seeds: list[int] = field(default_factory=list)  # one per feature row; empty = one batch draw


def find_runtime(patched: Any, adapter: LLMDiffAdapter) -> AdapterRuntime:
    wrappers = patched.wrappers.get(pe.WrappersMP.DIFFUSION_MODEL, {}).get(WRAPPER_KEY, [])
    for w in wrappers:
        if isinstance(w, DiffusionModelWrapper) and w.runtime.adapter is adapter:
            return w.runtime
    raise RuntimeError("apply_adapter did not register its DIFFUSION_MODEL wrapper: comfy_patch changed?")


def encode_rows(adapter: LLMDiffAdapter, features: LLMFeatures, hooks: TrainingHooks) -> torch.Tensor:
    """c for every row; with Langevin noise, row i draws its noise from row_seeds[i]."""
    if not hooks.langevin_noise:
        return adapter.encode(features)
    if len(hooks.row_seeds) != features.batch_size:
        return adapter.encode(features, noise=True)
    rows = []
    for i, seed in enumerate(hooks.row_seeds):
        g = torch.Generator(device=features.hidden.device).manual_seed(seed)
        rows.append(adapter.encode(features.select([i]), noise=True, generator=g))
    return torch.cat(rows)


def make_trainable(runtime: AdapterRuntime, hooks: TrainingHooks) -> None:
    """Override this runtime's entry builder (instance attribute; other runtimes are untouched)."""
    adapter = runtime.adapter

    def build_entry(batch: FeatureBatch, device: torch.device, dtype: torch.dtype) -> RunEntry:
        features = batch.materialize()
        check_features_match(runtime.config, features.spec)
        features = features.to(device)
        c = encode_rows(adapter, features, hooks)
        w_orig, w_new = adapter.gate_weights()
        entry = RunEntry(batch, device, dtype, c, KeyMask.from_mask(features.mask),
                         list(w_orig.unbind()), list(w_new.unbind()))
        if runtime.paper:
            entry.context = adapter.original_context(c).to(dtype)
            if runtime.config.needs_pooled:
                entry.pooled = adapter.pooled(c, features.mask)
        for i in range(len(runtime.sites)):
            runtime.new_kv(entry, i)
            if runtime.paper:
                runtime.orig_kv(entry, i)
        return entry

    runtime._build_entry = build_entry  # type: ignore[method-assign]


def patch_for_training(model_patcher: Any, adapter: LLMDiffAdapter, hooks: TrainingHooks) -> tuple[Any, AdapterRuntime]:
    """(patched ModelPatcher clone, its adapter runtime)."""
    patched = apply_adapter(model_patcher, adapter, strength=1.0)
    runtime = find_runtime(patched, adapter)
    make_trainable(runtime, hooks)
    return patched, runtime


def transformer_options(patched: Any) -> dict[str, Any]:
    """transformer_options as the sampler builds them: the patcher's model_options plus its wrappers
    and callbacks (comfy/sampler_helpers.py prepare_model_patcher)."""
    to = pe.copy_nested_dicts(patched.model_options.get("transformer_options", {}))
    pe.merge_nested_dicts(to.setdefault("wrappers", {}), patched.wrappers, copy_dict1=False)
    pe.merge_nested_dicts(to.setdefault("callbacks", {}), patched.callbacks, copy_dict1=False)
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
