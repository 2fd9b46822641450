"""One applied adapter at run time: AdapterRuntime, shared by all its patches and wrappers (comfy_patch.py).

It builds the per-run entries (run_entry.py) and runs a site's new path; the patches (site_patches.py) and the
model wrappers (model_wrappers.py) only decide where and when.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

import comfy.ldm.modules.attention

from . import fused_site
from .adapter import LLMDiffAdapter
from .attention import KeyLength, RunMask, attend, key_length_for_run
from .conditioning import FeatureBatch
from .config import SiteSpec
from .errors import LLMDiffError
from .features import LLMFeatures
from .run_cache import RunCache
from .run_entry import CallState, RunEntry, linear_in_dtype, weight_and_bias
from .site_stacks import SiteStack
from .validation import check_features_match

log = logging.getLogger("llmdiff")

# ComfyUI >= 0.3.6x calls transformer_options["optimized_attention_override"](func, q, k, v, heads, ...) from
# every attention function (wrap_attn). Where it does not, the left-over A_new is fused after to_out
# (site_patches.HybridFusion, an attn2_output_patch).
CORE_OVERRIDE_SUPPORTED = hasattr(comfy.ldm.modules.attention, "wrap_attn")


@dataclass(frozen=True)
class TrainingCall:
    """transformer_options[model_wrappers.TRAINING_KEY] of a U-Net call that trains the adapter. Such a call:

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


class SharedOnCopy:
    """Deep copies are the object itself: patches hold the U-Net's attn2 modules and the adapter."""

    def __deepcopy__(self, memo: dict) -> SharedOnCopy:
        return self


@dataclass(frozen=True)
class SiteBinding:
    spec: SiteSpec
    attn2: torch.nn.Module  # the U-Net's own cross-attention module at this site
    weight: float  # block weight (multiplies strength)


class AdapterRuntime(SharedOnCopy):
    """One applied adapter: its sites, settings and the per-run cache, shared by all its patches."""

    def __init__(self, adapter: LLMDiffAdapter, sites: list[SiteBinding], strength: float,
                 start_percent: float, end_percent: float, model_sampling: Any, stack_position: int = 0,
                 site_kernel: str = "auto") -> None:
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
        self.site_kernel = site_kernel  # hybrid sampling: a fused_site.SITE_KERNELS setting
        # the kernel of the sampling run under way (fused_site.kernel_for_run: "auto" decides per run); outside
        # a run (direct U-Net calls) auto is the three kernels
        self.run_site_kernel = fused_site.kernel_for_run(site_kernel)
        self.run_key_length: KeyLength = key_length_for_run(None)  # likewise from the run's compile (attention.py)
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

    def begin_run(self, model_sampling: Any, compile_kwargs: Mapping[str, Any] | None = None) -> None:
        """A sampling run starts: model_sampling is the one in use now (ModelSampling* nodes), compile_kwargs how
        ComfyUI's compile wrapper compiles this run's U-Net, if it does (the site kernel "auto" follows it)."""
        self._set_window(model_sampling)
        self.run_site_kernel = fused_site.kernel_for_run(self.site_kernel, compile_kwargs)
        self.run_key_length = key_length_for_run(compile_kwargs)
        self.runs.begin(self.adapter)

    def end_run(self) -> None:
        self.runs.end()
        self.run_site_kernel = fused_site.kernel_for_run(self.site_kernel)
        self.run_key_length = key_length_for_run(None)
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
            found = self.runs.find(
                lambda e: e.matches(batch, device, dtype, self.run_site_kernel, self.run_key_length))
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
                               key_length=self.run_key_length if training is None else "unmarked",
                               whole=whole, width=noise_tokens if whole else None)
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
            q_weights.append(weight_and_bias(self.adapter.sites[i].to_q, like)[0].to(device=device, dtype=dtype))
            if context_span is not None:
                orig_kv.append((keys(linear_in_dtype(site.attn2.to_k, context_span), heads),
                                keys(linear_in_dtype(site.attn2.to_v, context_span), heads)))
        entry = RunEntry(batch, device, dtype, per_row(c), mask, gates_orig, gates_new, q_weights, new_kv=new_kv,
                         orig_kv=orig_kv, context=None if context is None else _unet_context(per_row(context)),
                         pooled=pooled)
        if training is None:
            entry.site_kernel = self.run_site_kernel  # (a run with another kernel builds its own entry)
        if training is None and not self.paper and entry.site_kernel != "torch":
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
        if n.dtype == w.dtype:
            return torch.nn.functional.linear(n, w)
        return linear_in_dtype(self.adapter.sites[i].to_q, n)

    def orig_path(self, state: CallState, i: int, q: torch.Tensor) -> torch.Tensor:
        """Paper mode: w_orig * Attn(q, k(phi c), v(phi c)), w_orig folded into the entry's values."""
        return attend(q, *state.orig_key_value(i), state.entry.mask)

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


def _unet_context(phi_c: torch.Tensor) -> torch.Tensor:
    """Paper mode: the context the U-Net is handed, from phi(c) [R, T', context_dim].

    attn2 still projects it before our replace patch ignores the result: one token of phi(c) keeps that
    cheap and of the right width (CLIP may not even be connected). Contiguous, so its strides do not
    depend on the span's length T' (a compiled U-Net would recompile on them for every new length).
    """
    return phi_c[:, :1].contiguous()
