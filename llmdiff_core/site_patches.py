"""The attention patches at every cross-attention site (comfy_patch.py's wiring, DESIGN.md §1.2 Eq. 10).

hybrid (original_path "clip"): HybridNewPath (attn2_patch) computes w_new*A_new, or leaves the site's input for
fused_site's kernel; CoreFusion (the attention-core hook) fuses it with w_orig*A_orig before the site's own
to_out; FusedReplace does the same at a site another pack's replace patch occupies; HybridFusion (attn2_output_patch)
fuses after to_out where neither could. paper (original_path "llm"): PaperInput and PaperAttention (attn2 replace).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .adapter_runtime import AdapterRuntime, SharedOnCopy
from .attention import fuse_after_out, fuse_at_core
from .errors import LLMDiffError
from .run_entry import CallState, weight_and_bias


class _SitePatch(SharedOnCopy):
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
            return self._fused_site(i, n, out, w_orig)
        return out if s_new is None else fuse_at_core(out, s_new, w_orig)

    def _fused_site(self, i: int, n: torch.Tensor, a_orig: torch.Tensor, w_orig: torch.Tensor) -> torch.Tensor:
        """w_orig*A_orig + w_new*A_new at the attention core: one fused_site kernel where n, tau_q's weight,
        A_orig and the keys share a dtype (site kernel fused-attention: tau_q's GEMM first, then the kernel),
        else new_path and fuse_at_core."""
        runtime, state = self.runtime, self.state
        entry = state.entry
        w = entry.q_weights[i]
        keys, values = state.new_key_value(i)
        if entry.site_op is not None and n.dtype == w.dtype == a_orig.dtype == keys.dtype:
            if entry.site_kernel == "fused-attention":
                n, w = runtime.tau_q(entry, i, n), None
            return entry.site_op(n, w, keys, values, entry.mask.bias, entry.mask.keep, a_orig, w_orig)
        return fuse_at_core(a_orig, runtime.new_path(state, i, n), w_orig)


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
        weight, bias = weight_and_bias(self.runtime.sites[i].attn2.to_out[0], out)
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
        # w_orig*Attn(q, k, v) = Attn(q, k, w_orig*v): both gates are folded into the cached values
        a_orig = self.runtime.orig_path(state, i, q)
        if not state.has_new_path(i):
            return a_orig
        return a_orig + self.runtime.new_path(state, i, n).to(a_orig.dtype)

    def add(self, *args: Any, **kwargs: Any) -> None:
        # IPAdapter_plus calls .add() on whatever replace patch occupies a cross-attention key.
        raise LLMDiffError("A paper-mode LLMDiff adapter takes over cross-attention, so IP-Adapter (or another "
                           "attention-replacing patch) cannot be added after it. Use a hybrid (clip-mode) "
                           "LLMDiff adapter together with IP-Adapter.")
