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
  one U-Net call a training step (gates as tensors, Langevin noise, nothing cached). See TrainingCall.
- hybrid (original_path "clip"): composable patches, so other packs' attention patches (IP-Adapter)
  keep working: an attn2_patch computes w_new*A_new, ComfyUI's attention-core hook
  (transformer_options["optimized_attention_override"], chained) adds it to w_orig*A_orig before the
  site's own to_out, so the output projection runs once; at a site another pack's replace patch
  occupies, the replace's output is fused the same way (FusedReplace); an attn2_output_patch fuses
  after to_out only where neither happened (a ComfyUI without the hook). With a fused site kernel
  (fused_site.py, opt-in) the attn2_patch only leaves the site's input waiting, and the core hook runs the
  new path and the fusion in one kernel.
  paper (original_path "llm"): attn2 replace patches.

Patch objects deep-copy to themselves (ComfyUI 0.3.75 deep-copies model_options on every clone; a
copy would duplicate the U-Net and the adapter) and have no .to(): the adapter moves as a model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import comfy.ldm.modules.attention
import comfy.ops
import comfy.patcher_extension
from comfy.model_patcher import ModelPatcher

from . import fused_site
from .adapter import LLMDiffAdapter
from .attention import Gate, RunMask, attend, effective_gates, fuse_after_out, fuse_at_core, is_identity
from .conditioning import COND_KEY, FeatureBatch
from .config import SDXL_POOLED_DIM, SiteSpec
from .errors import LLMDiffError
from .features import LLMFeatures
from .run_cache import RunCache
from .site_stacks import SiteStack
from .unet_sites import find_sites
from .validation import check_adapter_matches_model, check_features_match

log = logging.getLogger("llmdiff")

WRAPPER_KEY = "llmdiff"
FEATURES_KEY = "llmdiff_features"  # transformer_options: the FeatureBatch of the current U-Net call
TRAINING_KEY = "llmdiff_training"  # transformer_options: a TrainingCall makes the U-Net call a training step
OVERRIDE_KEY = "optimized_attention_override"  # transformer_options: ComfyUI's hook at the attention core
# ComfyUI >= 0.3.6x calls transformer_options[OVERRIDE_KEY](func, q, k, v, heads, ...) from every attention
# function (wrap_attn). Where it does not, the left-over A_new is fused after to_out (attn2_output_patch).
CORE_OVERRIDE_SUPPORTED = hasattr(comfy.ldm.modules.attention, "wrap_attn")


@dataclass(frozen=True)
class TrainingCall:
    """transformer_options[TRAINING_KEY] of a U-Net call that trains the adapter. Such a call:

    - keeps the gates 0-d tensors of the adapter's parameters, so they get gradients (inference
      turns them into python floats, and gates (1, 0) skip the new path there);
    - adds the score encoding's Langevin noise when noise_seeds is given: one seed per feature row,
      row i drawn from torch.Generator(features' device).manual_seed(noise_seeds[i]), so a sample's
      noise depends on its seed alone (not on its batch or process); None = no noise;
    - caches nothing: c and every site's K/V are computed by the call itself, before the U-Net runs
      (outside any gradient-checkpointed block, so a recomputation in the backward pass finds them);
    - runs the U-Net outside an autocast already in its dtype (unet_autocast_off): see that function.
    Everything else (strength, block weights, the math) is what sampling runs.

    host_mask: the feature rows' key mask on the CPU ([B, <= T] bool, narrower = the rest masked), so the
    attended span is decided without a device->host sync in every training step (RunMask.prepare).
    noise_tokens: the token count each row's Langevin noise is drawn at (the trainer's max_tokens bucket),
    then cut to the tokens encoded (only those up to the attended span's end); None = the width of the
    features the call is given.
    whole_bucket: attend over the whole bucket (noise_tokens, else the width of the features given), not only
    up to the attended span's end (RunMask.prepare(whole=True)): one key length for every batch, so a compiled
    U-Net traces one static graph instead of a static one and then one with the key length dynamic (two
    compiles of the forward and backward: minutes each for SDXL). Only the span is encoded: the keys past
    it are zero padding, masked, so they add nothing: the same result.
    """

    noise_seeds: tuple[int, ...] | None = None
    host_mask: torch.Tensor | None = None
    noise_tokens: int | None = None
    whole_bucket: bool = False


class _Shared:
    """Deep copies are the object itself: patches hold the U-Net's attn2 modules and the adapter."""

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


# --- what is computed once per sampling run -----------------------------------------------------

def _uses_comfy_cast(linear: torch.nn.Module) -> bool:
    return bool(getattr(linear, "comfy_cast_weights", False) or getattr(linear, "weight_function", None)
                or getattr(linear, "bias_function", None))


def _project(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) in x's dtype, whatever dtype the layer is stored in."""
    if _uses_comfy_cast(linear):
        return linear(x)  # comfy ops cast (and LoRA-patch, under lowvram) the weight to x at call time
    return linear(x.to(linear.weight.dtype)).to(x.dtype)


def _weight_bias(linear: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a call of `linear` on `like` would use (cast / LoRA-patched ones included)."""
    if _uses_comfy_cast(linear):
        cast = comfy.ops.cast_bias_weight(linear, like)
        return cast[0], cast[1]
    return linear.weight, linear.bias


@dataclass
class RunEntry:
    """Everything derived from one FeatureBatch for one U-Net device/dtype (rows = the call's rows).

    K/V are kept trimmed to the attended token span and split into heads, in the U-Net dtype
    (RunMask.heads), and the mask as SDPA's additive bias: nothing of this is redone per call.
    Sampling keeps every site's K/V stacked by shape (new_keys ... orig_values, site_stacks.py: a compiled
    U-Net then takes a few inputs, not one per site); new_kv / orig_kv are views into those stacks.
    """

    batch: FeatureBatch
    device: torch.device
    dtype: torch.dtype
    c: torch.Tensor  # [R, T', D] float32, T' = mask.stop: the tokens up to the attended span's end
    mask: RunMask
    w_orig: list[float] | torch.Tensor  # per site: python floats (sampling) or one [N] tensor (TrainingCall)
    w_new: list[float] | torch.Tensor
    q_weights: list[torch.Tensor]  # per site: tau_q's weight in dtype on device (cast / LoRA-patched once)
    new_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per site: tau_k(c), tau_v(c) [R, H, T', d] in dtype
    orig_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # paper: k(phi c), v(phi c), as new_kv
    context: torch.Tensor | None = None  # paper: the U-Net's context, phi(c)'s first token [R, 1, context_dim] in dtype
    pooled: torch.Tensor | None = None  # paper, SDXL: [R, 1280]
    scaled: dict[float, ScaledSites] = field(default_factory=dict)  # per strength, float gates only
    new_keys: SiteStack | None = None  # sampling: tau_k(c) of every site, stacked (new_kv's keys are its views)
    new_vals: SiteStack | None = None  # sampling: tau_v(c), before the gates scale it
    orig_keys: SiteStack | None = None  # paper-mode sampling: k(phi c), stacked
    orig_vals: SiteStack | None = None
    # sampling, hybrid: per site, whether fused_site's kernel runs its new path and fusion (a site_kernel other
    # than "torch", and shapes it takes); site_op is that kernel's op, looked up once per run, not while compiling
    fused: tuple[bool, ...] = ()
    site_op: Callable[..., torch.Tensor] | None = None

    def matches(self, batch: FeatureBatch, device: torch.device, dtype: torch.dtype) -> bool:
        return self.device == device and self.dtype == dtype and self.batch.same_rows(batch)

    def scaled_sites(self, scale: float, block_weights: Sequence[float]) -> ScaledSites:
        """Every site's effective gates at strength `scale` and its gate-scaled values
        (g * Attn(q, k, v) = Attn(q, k, g * v)).

        Float gates (sampling) are worked out once per run and strength, not per U-Net call; tensor gates
        (TrainingCall: one entry per call) multiply here and keep their gradient.
        """
        if isinstance(self.w_orig, torch.Tensor):
            return self._scaled_tensor_sites(scale, block_weights)
        found = self.scaled.get(scale)
        if found is not None:
            return found
        gates = [effective_gates(wo, wn, scale * w) for wo, wn, w in zip(self.w_orig, self.w_new, block_weights)]
        assert self.new_vals is not None, "float gates are sampling's: its entries are stacked"
        new_stack = self.new_vals.scaled([wn for _, wn in gates], self.mark_stack)
        new = [None if is_identity(wo, wn) else new_stack.views[i] for i, (wo, wn) in enumerate(gates)]
        orig_stack = None if self.orig_vals is None else self.orig_vals.scaled([wo for wo, _ in gates], self.mark_stack)
        fusion_stack = None  # paper mode folds w_orig into its values: no fusion
        if orig_stack is None:  # one host->device copy per run and strength (not per step: no sync there)
            fusion_stack = SiteStack.one(torch.tensor([wo for wo, _ in gates], dtype=torch.float32,
                                                      device=self.device))
        found = ScaledSites(gates, new, None if orig_stack is None else list(orig_stack.views),
                            [] if fusion_stack is None else list(fusion_stack.views),
                            new_stack, orig_stack, fusion_stack)
        self.scaled[scale] = found
        return found

    def mark_stack(self, stack: torch.Tensor) -> torch.Tensor:
        """A [sites, B, H, T', d] stack with its key length marked as varying (RunMask.varying_keys)."""
        return self.mask.varying_keys(stack, dim=3)

    def _scaled_tensor_sites(self, scale: float, block_weights: Sequence[float]) -> ScaledSites:
        """Tensor gates (TrainingCall, one entry per call, with gradients): effective_gates runs once on
        the [N] gate vectors instead of once per site (the same formula per element, so the same bits),
        leaving one multiply per site and value tensor."""
        assert isinstance(self.w_new, torch.Tensor)
        if len(set(block_weights)) == 1:
            s: Gate = scale * block_weights[0]
        else:
            s = torch.tensor([scale * w for w in block_weights], device=self.w_orig.device)
        w_orig, w_new = effective_gates(self.w_orig, self.w_new, s)
        dtype = self.new_kv[0][1].dtype
        new = [v * g for (_, v), g in zip(self.new_kv, w_new.to(dtype).unbind())]
        orig = None
        if self.orig_kv is not None:
            orig = [v * g for (_, v), g in zip(self.orig_kv, w_orig.to(dtype).unbind())]
        gates = list(zip(w_orig.unbind(), w_new.unbind()))
        return ScaledSites(gates, new, orig, [wo for wo, _ in gates])


@dataclass(frozen=True)
class ScaledSites:
    """Per site at one strength: the effective (w_orig, w_new) and the values the patches read,
    w_new*tau_v(c) (None where the gates are the identity) and in paper mode w_orig*v(phi c).

    fusion_weights: per site, the w_orig that hybrid mode's fusion (fuse_at_core) multiplies A_orig by, as a
    0-d tensor on the U-Net's device (training: the gate tensor itself; sampling in paper mode: none). A
    compiled U-Net then reads a value rather than a Python float it would guard on: a new strength or
    block weight does not recompile.
    new_stack, orig_stack, fusion_stack (sampling): the same values stacked, the fusion weights as one [N] vector:
    what a compiled U-Net reads (site_stacks.py); the lists above are their views.
    """

    gates: list[tuple[Gate, Gate]]
    new_values: list[torch.Tensor | None]
    orig_values: list[torch.Tensor] | None
    fusion_weights: list[torch.Tensor]
    new_stack: SiteStack | None = None
    orig_stack: SiteStack | None = None
    fusion_stack: SiteStack | None = None
    active: tuple[bool, ...] = field(init=False)  # per site: whether it has a new path (gates not the identity)

    def __post_init__(self) -> None:
        object.__setattr__(self, "active", tuple(v is not None for v in self.new_values))


@dataclass(frozen=True)
class CallState:
    """One U-Net call: its run entry and each site's effective (w_orig, w_new).

    scaled: the entry's ScaledSites for this call's strength (gates, gate-scaled values, fusion weights),
    prepared before the U-Net runs, so the patches inside it only read (nothing for a compiled U-Net to trace
    but tensor math); the patches read them through the methods below.

    pending: site -> w_new*A_new, from the attn2_patch until the attention core (CoreFusion) or,
    failing that, the attn2_output_patch takes it. It lives here, not in the patches' extra_options,
    because the core override sees transformer_options itself (both hold this object).
    deferred: site -> its normed input n, where the entry runs the site with fused_site's one kernel: the core
    computes the new path and the fusion together (AdapterRuntime.fused_path); anywhere else, the new path is
    computed from n when it is taken (take_scaled_new).
    at_core: per site, whether the attention core may fuse (no replace patch occupies the site).
    """

    entry: RunEntry
    scaled: ScaledSites
    at_core: list[bool] = field(default_factory=list)
    pending: dict[int, torch.Tensor] = field(default_factory=dict)
    deferred: dict[int, torch.Tensor] = field(default_factory=dict)

    def any_new_path(self) -> bool:
        return any(self.scaled.active)

    def any_pending(self) -> bool:
        return bool(self.pending or self.deferred)

    def take_scaled_new(self, i: int, runtime: AdapterRuntime) -> torch.Tensor | None:
        """Site i's w_new*A_new if it is waiting (computed now if it was deferred to the fused kernel), else None."""
        found = self.pending.pop(i, None)
        if found is None and i in self.deferred:
            found = runtime.new_path(self, i, self.deferred.pop(i))
        return found

    def has_new_path(self, i: int) -> bool:
        """Whether site i's gates leave it a new path (not (1, 0)). A bool, not a look at its values: a compiled
        U-Net would guard on that tensor's shape (a recompile per key length) even where it reads the stack."""
        return self.scaled.active[i]

    # What the patches read at site i. Sampling's come from the run's stacks (training's entries have none), so
    # that a compiled U-Net takes each stack as one input (a CUDA-graph replay copies every input) and indexes
    # it inside the graph.
    def new_key_value(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tau_k(c) and w_new*tau_v(c) of site i."""
        keys, values = self.entry.new_keys, self.scaled.new_stack
        if keys is None or values is None:
            return self.entry.new_kv[i][0], self.scaled.new_values[i]
        return keys.site(i), values.site(i)

    def orig_key_value(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Paper mode: k(phi c) and w_orig*v(phi c) of site i."""
        keys, values = self.entry.orig_keys, self.scaled.orig_stack
        if keys is None or values is None:
            assert self.entry.orig_kv is not None and self.scaled.orig_values is not None
            return self.entry.orig_kv[i][0], self.scaled.orig_values[i]
        return keys.site(i), values.site(i)

    def fusion_weight(self, i: int) -> torch.Tensor:
        """Hybrid mode: the w_orig that fuse_at_core multiplies A_orig by at site i."""
        stack = self.scaled.fusion_stack
        return self.scaled.fusion_weights[i] if stack is None else stack.site(i)

    def orig_gate(self, i: int) -> Gate:
        """Site i's effective w_orig (the fallback fusion after to_out)."""
        return self.scaled.gates[i][0]


@dataclass(frozen=True)
class SiteBinding:
    spec: SiteSpec
    attn2: torch.nn.Module  # the U-Net's own cross-attention module at this site
    weight: float  # block weight (multiplies strength)


class AdapterRuntime(_Shared):
    """One applied adapter: its sites, settings and the per-run cache, shared by all its patches."""

    def __init__(self, adapter: LLMDiffAdapter, sites: list[SiteBinding], strength: float,
                 start_percent: float, end_percent: float, model_sampling: Any, stack_position: int = 0,
                 site_kernel: str = "torch") -> None:
        self.adapter = adapter
        self.config = adapter.config
        self.paper = adapter.config.original_path == "llm"
        self.sites = sites
        self.site_index = {s.spec.key: i for i, s in enumerate(sites)}
        self.block_weights = [s.weight for s in sites]
        self.strength = strength
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.whole_run = start_percent <= 0.0 and end_percent >= 1.0  # the default window: always active
        self.site_kernel = site_kernel  # hybrid sampling: fused_site.SITE_KERNELS (not "torch": fused_site's kernel)
        self.cache_enabled = True  # off: recompute every call (tests compare the two)
        # a sampling run's entries, kept for the next run with the same prompts in hybrid mode; paper mode's
        # entry also projects with the U-Net's own to_k / to_v, whose weights a LoRA or a lowvram weight patch
        # can change unseen between runs (run_cache.py)
        self.runs: RunCache[RunEntry] = RunCache(across_runs=not self.paper)
        # Several adapters may be stacked: one key each. The key is their place in the stack, not a
        # fresh id, so a re-applied adapter (new strength) keeps the key and a compiled U-Net its graph.
        self.state_key = f"llmdiff_state_{stack_position}"
        self.project_sites: Callable[..., list[tuple[torch.Tensor, torch.Tensor]]] = self._site_projections
        self._set_window(model_sampling)

    # sampling runs
    def _set_window(self, model_sampling: Any) -> None:
        self.sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
        self.sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))

    def begin_run(self, model_sampling: Any) -> None:
        self._set_window(model_sampling)  # the model_sampling in use now (ModelSampling* nodes)
        self.runs.begin(self.adapter)

    def end_run(self) -> None:
        self.runs.end()
        log.debug("LLMDiff run: %d adapter entries built, %d taken from the last run", self.runs.built,
                  self.runs.reused)

    def is_active(self, sigmas: torch.Tensor | None) -> bool:
        if sigmas is None or self.whole_run:  # outside a sampler (training, direct calls), or every sigma
            return True  # (no float(sigmas): a device->host sync per U-Net call on a GPU)
        sigma = float(sigmas.detach().reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start

    # per-run cache
    def entry_for(self, batch: FeatureBatch, device: torch.device, dtype: torch.dtype,
                  training: TrainingCall | None = None) -> RunEntry:
        caching = self.cache_enabled and training is None and self.runs.active
        if caching:
            found = self.runs.find(lambda e: e.matches(batch, device, dtype))
            if found is not None:
                return found
        entry = self._build_entry(batch, device, dtype, training)
        if caching:
            self.runs.add(entry)
        return entry

    def _build_entry(self, batch: FeatureBatch, device: torch.device, dtype: torch.dtype,
                     training: TrainingCall | None) -> RunEntry:
        """c, the gates and every site's K/V (and in paper mode phi(c), the pooled vector).

        Sampling computes them for the distinct rows of the call and indexes the results (a latent batch
        of one prompt repeats its row); training rows each have their own noise seed, so all are computed.
        """
        for part in batch.parts:  # first: another LLM's features get the clear error, not a shape error
            check_features_match(self.config, part.features.spec)
        if training is None:  # the distinct rows' key mask first: the span it decides says how much to copy
            key_mask, rows = batch.distinct_mask()
        else:
            features, rows = batch.materialize(), list(range(batch.num_rows))
            key_mask = features.mask
        # RunMask decides the span on the host: on the features' mask while it is still there (sampling), on
        # the batch's host mask in training, whose features are already on the device (no sync per step)
        identity = rows == list(range(key_mask.shape[0]))
        # The noise is drawn over the tokens the call was given, or the trainer's bucket, so it does not depend
        # on the span; a whole-bucket call attends over that bucket
        noise_tokens = (training.noise_tokens if training is not None else None) or key_mask.shape[1]
        whole = training is not None and training.whole_bucket
        mask = RunMask.prepare(key_mask if identity else key_mask[rows], dtype, device,
                               host_mask=None if training is None else training.host_mask,
                               whole=whole, dynamic=training is None, width=noise_tokens if whole else None)
        # every token the adapter reads lies before mask.read_stop: only those are copied, moved and encoded.
        # Sampling moves the distinct rows cut there, only what the encoding reads (score: H_0 and the scores),
        # and joins them on the device (FeatureBatch.distinct). A training batch's captions fill ~half of the
        # 128-token bucket, and the encoding's float32 [B, L, T, D] scores are its largest tensor, kept for its
        # backward.
        if training is None:
            features, _ = batch.distinct(self.config.features_read(), tokens=mask.read_stop, device=device)
        else:
            features = features.first_tokens(mask.read_stop).to(device)
        c = c_read = self._encode(features, None if training is None else training.noise_seeds, noise_tokens)
        if c.shape[1] < mask.stop:  # (whole bucket) the keys past the span are masked: zeros give them their shape
            c = torch.nn.functional.pad(c, (0, 0, 0, mask.stop - c.shape[1]))
        index = None if identity else torch.tensor(rows, device=device)

        def per_row(t: torch.Tensor) -> torch.Tensor:  # distinct rows -> the call's rows
            return t if index is None else t.index_select(0, index)

        def keys(t: torch.Tensor, heads: int) -> torch.Tensor:  # [R, T', H*d] -> the call's [B, H, T', d]
            # a view: sampling's stacks (below) copy it into place, a training step reads it once
            return per_row(mask.heads(t, heads, contiguous=False))
        project = self._site_projections if training is None else self.project_sites
        w_orig, w_new = self.adapter.gate_weights()
        gates_orig: list[float] | torch.Tensor = w_orig
        gates_new: list[float] | torch.Tensor = w_new
        if training is None:  # floats: no autograd per call, and gates (1, 0) are seen to be the identity
            gates_orig, gates_new = w_orig.tolist(), w_new.tolist()
        context = pooled = orig_kv = None
        if self.paper:
            context = self.adapter.original_context(c).to(dtype)
            if self.config.needs_pooled:
                pooled = per_row(self.adapter.pooled(c_read, features.mask))
            orig_kv = []
        # K/V are per token: project only the attended span (training does this every step)
        c_span = mask.span(c)
        context_span = None if context is None else mask.span(context)
        like = torch.empty(0, dtype=dtype, device=device)
        new_kv = [(per_row(k), per_row(v)) for k, v in project(c_span, dtype, mask)]
        q_weights = []
        for i, site in enumerate(self.sites):
            heads = site.spec.heads
            q_weights.append(_weight_bias(self.adapter.sites[i].to_q, like)[0].to(device=device, dtype=dtype))
            if context_span is not None:
                orig_kv.append((keys(_project(site.attn2.to_k, context_span), heads),
                                keys(_project(site.attn2.to_v, context_span), heads)))
        entry = RunEntry(batch, device, dtype, per_row(c), mask, gates_orig, gates_new, q_weights, new_kv=new_kv,
                         orig_kv=orig_kv, context=None if context is None else _unet_context(per_row(context)),
                         pooled=pooled)
        if training is None and not self.paper and self.site_kernel != "torch":
            entry.fused = tuple(fused_site.applies(device, dtype, s.spec.heads, w.shape[0] // s.spec.heads,
                                                   mask.stop - mask.start) for s, w in zip(self.sites, q_weights))
            entry.site_op = fused_site.op() if any(entry.fused) else None
        if training is None:  # stacked by shape: a compiled U-Net takes a few inputs, not a few per site
            entry.new_keys, entry.new_vals = (SiteStack.of(t, entry.mark_stack) for t in zip(*new_kv))
            entry.new_kv = list(zip(entry.new_keys.views, entry.new_vals.views))
            if orig_kv is not None:
                entry.orig_keys, entry.orig_vals = (SiteStack.of(t, entry.mark_stack) for t in zip(*orig_kv))
                entry.orig_kv = list(zip(entry.orig_keys.views, entry.orig_vals.views))
        return entry

    def _site_projections(self, c_span: torch.Tensor, dtype: torch.dtype,
                          mask: RunMask) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every site's tau_k(c), tau_v(c) in dtype, split into heads: [R, H, T', d] views (RunMask.heads).

        A training call runs it as self.project_sites, which compile_training_projections replaces with a
        compiled copy: ~8 ops per site (70 sites for SDXL) and their backward, as two graphs instead of hundreds
        of dispatches every step."""
        out = []
        for i, site in enumerate(self.sites):
            k, v = (mask.heads(t if t.dtype == dtype else t.to(dtype), site.spec.heads, contiguous=False)
                    for t in self.adapter.site_keys_values(i, c_span))
            out.append((k, v))
        return out

    def compile_training_projections(self, backend: Any, mode: str | None = None) -> None:
        """Training calls project every site's K/V through torch.compile (training/patching.compile_unet)."""
        self.project_sites = torch.compile(self._site_projections, backend=backend, mode=mode)

    def _encode(self, features: LLMFeatures, noise_seeds: Sequence[int] | None,
                noise_tokens: int | None = None) -> torch.Tensor:
        """c; with noise_seeds (TrainingCall), row i adds its Langevin noise drawn from its own seed over
        noise_tokens tokens (default: the features' own), cut to the features' tokens."""
        if noise_seeds is None:
            return self.adapter.encode(features)
        if len(noise_seeds) != features.batch_size:
            raise ValueError(f"{len(noise_seeds)} noise seeds for {features.batch_size} feature rows")
        if self.adapter.encoder.mode != "score":  # the other encodings have no noise
            return self.adapter.encode(features)
        # each row's draws from its own seed, the encoding once for the batch (not once per row: ~40 ops per
        # row and step, forward and backward). Drawn at the full bucket and cut to the tokens encoded, so a
        # token's noise does not depend on how far its batch's attended span reaches.
        n, device = features.num_tokens, features.hidden.device
        tokens = noise_tokens or n
        if tokens < n:
            raise ValueError(f"Langevin draws over {tokens} tokens for features of {n} tokens")
        row_shape = (1, tokens, features.spec.hidden_size)
        eps = torch.cat([torch.randn(row_shape, generator=torch.Generator(device=device).manual_seed(seed),
                                     device=device, dtype=torch.float32)[:, :n] for seed in noise_seeds])
        return self.adapter.encode(features, eps=eps)

    def call_state(self, batch: FeatureBatch, rows: int, device: torch.device, dtype: torch.dtype,
                   sigmas: torch.Tensor | None, training: TrainingCall | None = None,
                   replaced: Any = None) -> CallState | None:
        """The state of one U-Net call of `rows` rows that runs in `dtype` on `device`."""
        scale = self.strength if self.is_active(sigmas) else 0.0
        if scale == 0.0 and not self.paper:
            return None  # hybrid: exactly the unpatched model, nothing to compute
        if batch.num_rows != rows:
            raise RuntimeError(f"LLMDiff: {batch.num_rows} feature rows for a U-Net batch of {rows}")
        entry = self.entry_for(batch, device, dtype, training)
        scaled = entry.scaled_sites(scale, self.block_weights)
        if self.paper or not CORE_OVERRIDE_SUPPORTED:
            at_core = [False] * len(self.sites)
        elif replaced:  # a replace patch (IP-Adapter) computes that site's attention: FusedReplace fuses there
            at_core = [s.spec.key not in replaced and s.spec.block not in replaced for s in self.sites]
        else:
            at_core = [True] * len(self.sites)
        return CallState(entry, scaled, at_core)

    # attention-patch helpers
    def site_of(self, eo: dict[str, Any]) -> int | None:
        block = eo.get("block")
        return None if block is None else self.site_index.get((block[0], block[1], eo.get("block_index", 0)))

    def new_path(self, state: CallState, i: int, n: torch.Tensor) -> torch.Tensor:
        """w_new * Attn(tau_q(n), tau_k(c), tau_v(c)) with the padding/BOS mask, in n's dtype.

        w_new is folded into tau_v(c) (RunEntry.scaled_sites); tau_q's weight is the entry's, already
        in the U-Net dtype.
        """
        keys, values = state.new_key_value(i)
        assert values is not None, "a site whose gates are the identity has no new path"
        return attend(self.tau_q(state.entry, i, n), keys, values, state.entry.mask)

    def tau_q(self, entry: RunEntry, i: int, n: torch.Tensor) -> torch.Tensor:
        """Site i's tau_q(n) in n's dtype: the entry's weight (already cast, LoRA-patched) where n is in it."""
        w = entry.q_weights[i]
        return torch.nn.functional.linear(n, w) if n.dtype == w.dtype else _project(self.adapter.sites[i].to_q, n)

    def fused_path(self, state: CallState, i: int, n: torch.Tensor, a_orig: torch.Tensor,
                   w_orig: torch.Tensor) -> torch.Tensor:
        """w_orig*A_orig + w_new*A_new at the attention core: one fused_site kernel where n, tau_q's weight,
        A_orig and the keys share a dtype (site kernel fused-attention: tau_q's GEMM first, then the kernel),
        else new_path and fuse_at_core."""
        entry = state.entry
        w = entry.q_weights[i]
        keys, values = state.new_key_value(i)
        if entry.site_op is not None and n.dtype == w.dtype == a_orig.dtype == keys.dtype:
            if self.site_kernel == "fused-attention":
                n, w = self.tau_q(entry, i, n), None
            return entry.site_op(n, w, keys, values, entry.mask.bias, entry.mask.keep, a_orig, w_orig)
        return fuse_at_core(a_orig, self.new_path(state, i, n), w_orig)

    def no_clip_error(self, width: int) -> LLMDiffError:
        """Hybrid mode reads CLIP; without it Text Encode (LLMDiff) leaves a 1-wide placeholder."""
        return LLMDiffError(
            f"This hybrid (clip-mode) LLMDiff adapter keeps the original CLIP path, but the conditioning holds "
            f"no CLIP tensor of width {self.config.context_dim} (width {width}: a Text Encode (LLMDiff) without "
            f"a CLIP connected). Connect the checkpoint's CLIP to Text Encode (LLMDiff), or use a paper-mode adapter.")

    def missing_features_error(self, transformer_options: dict[str, Any]) -> LLMDiffError:
        kinds = set(transformer_options.get("cond_or_uncond") or [])
        which = {frozenset({0}): "positive", frozenset({1}): "negative"}.get(frozenset(kinds), "positive or negative")
        return LLMDiffError(
            f"The {which} conditioning carries no LLM features, but this is a paper-mode LLMDiff adapter "
            f"(original_path 'llm'), which replaces CLIP entirely: encode the positive and the negative prompt "
            f"with Text Encode (LLMDiff), or use a hybrid (clip-mode) adapter.")


# --- wrappers -----------------------------------------------------------------------------------

def _unet_dtype(base_model: Any) -> torch.dtype:
    """The dtype BaseModel._apply_model runs the U-Net in (its manual-cast dtype, else the weights')."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


class ApplyModelWrapper(_Shared):
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


def _unet_context(phi_c: torch.Tensor) -> torch.Tensor:
    """Paper mode: the context the U-Net is handed, from phi(c) [R, T', context_dim].

    attn2 still projects it before our replace patch ignores the result: one token of phi(c) keeps that
    cheap and of the right width (CLIP may not even be connected). Contiguous, so its strides do not
    depend on the span's length T' (a compiled U-Net would recompile on them for every new length).
    """
    return phi_c[:, :1].contiguous()


def _paper_unet_inputs(entry: RunEntry, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Paper mode: the U-Net context and (SDXL) y with phi(c) and phi_pool in place of CLIP's."""
    if entry.pooled is not None and y is not None:
        y = torch.cat([entry.pooled.to(y), y[:, SDXL_POOLED_DIM:]], dim=1)
    return entry.context, y


class ForgetKeptRuns(_Shared):
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


class OuterSampleWrapper(_Shared):
    """Starts and ends the per-run cache around one sampling run."""

    def __init__(self, runtime: AdapterRuntime) -> None:
        self.runtime = runtime

    def __call__(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj
        self.runtime.begin_run(guider.model_patcher.get_model_object("model_sampling"))
        try:
            return executor(*args, **kwargs)
        finally:
            self.runtime.end_run()  # keeps its entries for the next run (hybrid), or frees them


# --- attention patches --------------------------------------------------------------------------

class _SitePatch(_Shared):
    def __init__(self, runtime: AdapterRuntime) -> None:
        self.runtime = runtime
        self.stash_key = runtime.state_key + "_stash"  # eo is shared by the patches of one block call

    def _state_and_site(self, eo: dict[str, Any]) -> tuple[CallState | None, int | None]:
        return eo.get(self.runtime.state_key), self.runtime.site_of(eo)


class HybridNewPath(_SitePatch):
    """attn2_patch: computes the LLM path's attention (w_new*A_new) on the block's normed input and
    leaves it pending in the CallState; inputs unchanged."""

    def __call__(self, n: torch.Tensor, context: Any, value: Any, eo: dict[str, Any]) -> tuple[Any, Any, Any]:
        state, i = self._state_and_site(eo)
        if state is not None and i is not None and state.has_new_path(i):
            if state.entry.fused and state.entry.fused[i] and state.at_core[i]:
                state.deferred[i] = n  # the core runs the new path and the fusion in one kernel
            else:
                state.pending[i] = self.runtime.new_path(state, i, n)
        return n, context, value


class CoreFusion:
    """transformer_options["optimized_attention_override"] of one U-Net call (hybrid mode).

    At the attention core of a site's attn2 whose w_new*A_new is pending, it returns
    w_orig*attn(q, k, v) + w_new*A_new, so the module's own to_out projects the fused result once:
    to_out(w_orig*A_orig + w_new*A_new) is Eq. 10 with no second output projection. Every other
    call (attn1, other sites, other attention users) goes through unchanged. An override that was
    already set is chained: it computes attn(q, k, v) in place of the default.
    """

    __slots__ = ("runtime", "state", "previous")

    def __init__(self, runtime: AdapterRuntime, state: CallState, previous: Callable | None) -> None:
        self.runtime, self.state, self.previous = runtime, state, previous

    def __deepcopy__(self, memo: dict) -> CoreFusion:
        return self

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        s_new = n = None
        if state.any_pending():
            i = self.runtime.site_of(kwargs.get("transformer_options") or {})
            if i is not None and state.at_core[i]:
                q = args[0] if args else None
                plain = (isinstance(q, torch.Tensor) and not kwargs.get("skip_reshape")
                         and not kwargs.get("skip_output_reshape"))
                if plain and i in state.pending and q.shape == state.pending[i].shape:
                    s_new = state.pending.pop(i)
                elif (plain and i in state.deferred and q.shape[:-1] == state.deferred[i].shape[:-1]
                      and q.shape[-1] == state.entry.q_weights[i].shape[0]):
                    n = state.deferred.pop(i)
                if s_new is not None or n is not None:
                    w_orig = state.fusion_weight(i)
        out = func(*args, **kwargs) if self.previous is None else self.previous(func, *args, **kwargs)
        if n is not None:
            return self.runtime.fused_path(state, i, n, out, w_orig)
        return out if s_new is None else fuse_at_core(out, s_new, w_orig)


class FusedReplace:
    """Wraps another pack's attn2 replace patch (IP-Adapter) for one U-Net call (hybrid mode): its output
    is that site's A_orig, so w_orig*replace(q, k, v) + w_new*A_new goes into the block's to_out,
    as CoreFusion does at sites without a replace patch. Attributes are the wrapped patch's.
    """

    def __init__(self, runtime: AdapterRuntime, state: CallState, inner: Callable) -> None:
        self.runtime, self.state, self.inner = runtime, state, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __deepcopy__(self, memo: dict) -> FusedReplace:
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eo: dict[str, Any]) -> torch.Tensor:
        out = self.inner(q, k, v, eo)
        i = self.runtime.site_of(eo)
        s_new = None if i is None else self.state.pending.get(i)
        if s_new is None or s_new.shape != out.shape:
            return out  # the output patch fuses it after to_out
        del self.state.pending[i]
        return fuse_at_core(out, s_new, self.state.fusion_weight(i))


class HybridFusion(_SitePatch):
    """attn2_output_patch, the fallback: out' = to_out(w_orig*A_orig + w_new*A_new), from out = to_out(A_orig),
    for a pending w_new*A_new the attention core did not take (a replace patch such as IP-Adapter's
    occupies the site, or a ComfyUI without the core override).

    Whatever earlier output patches added to `out` counts as part of the original path here.
    """

    def __call__(self, out: torch.Tensor, eo: dict[str, Any]) -> torch.Tensor:
        state, i = self._state_and_site(eo)
        if state is None or not state.any_pending() or i is None:
            return out
        s_new = state.take_scaled_new(i, self.runtime)
        if s_new is None:
            return out
        weight, bias = _weight_bias(self.runtime.sites[i].attn2.to_out[0], out)
        return fuse_after_out(out, s_new, weight, bias, state.orig_gate(i))


class PaperInput(_SitePatch):
    """attn2_patch (paper mode): keeps the block's normed input for tau_q; the replace patch gets q only."""

    def __call__(self, n: torch.Tensor, context: Any, value: Any, eo: dict[str, Any]) -> tuple[Any, Any, Any]:
        eo[self.stash_key] = n
        return n, context, value


class PaperAttention(_SitePatch):
    """attn2 replace (paper mode): w_orig*Attn(q, k(phi c), v(phi c)) + w_new*Attn(tau_q n, tau_k c, tau_v c)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eo: dict[str, Any]) -> torch.Tensor:
        state, i = self._state_and_site(eo)
        n = eo.pop(self.stash_key, None)
        if state is None or n is None:
            raise self.runtime.missing_features_error(eo)
        # k, v are the projections of the 1-token context slice: unused, the entry's are complete.
        entry = state.entry
        # w_orig*Attn(q, k, v) = Attn(q, k, w_orig*v): both gates are folded into the cached values
        a_orig = attend(q, *state.orig_key_value(i), entry.mask)
        if not state.has_new_path(i):
            return a_orig
        return a_orig + self.runtime.new_path(state, i, n).to(a_orig.dtype)

    def add(self, *args: Any, **kwargs: Any) -> None:
        # IPAdapter_plus calls .add() on whatever replace patch occupies a cross-attention key.
        raise LLMDiffError("A paper-mode LLMDiff adapter takes over cross-attention, so IP-Adapter (or another "
                           "attention-replacing patch) cannot be added after it. Use a hybrid (clip-mode) "
                           "LLMDiff adapter together with IP-Adapter.")


# --- apply ----------------------------------------------------------------------------------------

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
    sampling): "torch" (three kernels per site), "fused" (fused_site.py, one Triton kernel where it applies) or
    "fused-attention" (tau_q's GEMM, then the attention and the fusion in one kernel); default
    $LLMDIFF_SITE_KERNEL, else "torch".
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
