"""What the adapter computes before a U-Net call and its patches only read (comfy_patch.py's wiring).

RunEntry: once per sampling run (or per training call): c, the mask and every site's K/V.
ScaledSites: an entry's gates and gate-scaled values at one strength.
CallState: one U-Net call's entry, scaled sites and the new paths waiting for their fusion.
linear_in_dtype / weight_and_bias: a U-Net or adapter linear applied (or read) as ComfyUI's ops cast it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

import comfy.ops

from .attention import Gate, KeyLength, RunMask, effective_gates, is_identity
from .conditioning import FeatureBatch
from .site_stacks import SiteStack

if TYPE_CHECKING:
    from .adapter_runtime import AdapterRuntime


def _uses_comfy_cast(linear: torch.nn.Module) -> bool:
    # truth tests, not bool(): torch 2.11's dynamo cannot trace bool() of a list or dict (a graph break per call)
    for name in ("comfy_cast_weights", "weight_function", "bias_function"):
        if getattr(linear, name, None):
            return True
    return False


def linear_in_dtype(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) in x's dtype, whatever dtype the layer is stored in."""
    if _uses_comfy_cast(linear):
        return linear(x)  # comfy ops cast (and LoRA-patch, under lowvram) the weight to x at call time
    return linear(x.to(linear.weight.dtype)).to(x.dtype)


def weight_and_bias(linear: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    # sampling: the run's site kernel (fused_site.kernel_for_run); hybrid: per site, whether fused_site's kernel
    # runs its new path and fusion (a site kernel other than "torch", and shapes it takes); site_op is that
    # kernel's op, looked up once per run, not while compiling
    site_kernel: str = "torch"
    fused: tuple[bool, ...] = ()
    site_op: Callable[..., torch.Tensor] | None = None

    def matches(self, batch: FeatureBatch, device: torch.device, dtype: torch.dtype, site_kernel: str,
                key_length: KeyLength) -> bool:
        """Whether this entry serves a run of these rows, device, dtype, site kernel and key-length marking (an
        entry marked for another compile would make that compile trace the wrong graph)."""
        return (self.device == device and self.dtype == dtype and self.site_kernel == site_kernel
                and self.mask.key_length == key_length and self.batch.same_rows(batch))

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
        """A [sites, B, H, T', d] stack with its key length marked for torch.compile (RunMask.mark_key_length)."""
        return self.mask.mark_key_length(stack, dim=3)

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
    computes the new path and the fusion together (site_patches.CoreFusion); anywhere else, the new path is
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
        return len(self.pending) > 0 or len(self.deferred) > 0  # (not bool(dict): see _uses_comfy_cast)

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
