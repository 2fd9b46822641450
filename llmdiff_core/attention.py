"""The per-site math of LLMDiff (DESIGN.md §1.2, Eq. 10) as pure torch functions.

    f_i = w_orig * Attn(q(x), k(ctx), v(ctx)) + w_new * Attn(tau_q(x), tau_k(c), tau_v(c))

Shared by the ComfyUI patch (comfy_patch.py) and training; no ComfyUI import here. Everything is
differentiable, and the gates may be python floats or 0-d tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

Gate = float | torch.Tensor


def effective_gates(w_orig: Gate, w_new: Gate, scale: Gate) -> tuple[Gate, Gate]:
    """Gates at strength `scale`: scale 0 is the original path alone (weight 1), 1 is as trained."""
    return 1.0 + scale * (w_orig - 1.0), scale * w_new


def is_identity(w_orig: Gate, w_new: Gate) -> bool:
    """True when the gates leave the original output exactly as it is (nothing to compute)."""
    return (not isinstance(w_orig, torch.Tensor) and not isinstance(w_new, torch.Tensor)
            and w_orig == 1.0 and w_new == 0.0)


# --- prepared once per sampling run (run_entry.RunEntry) -------------------------------------------

SPAN_BUCKET = 32  # the new path's attention sees key lengths that are multiples of this (RunMask)

# How a run's tensors mark their key length for torch.compile (RunMask.mark_key_length): "dynamic" (sampling: one
# graph for every span), "static" (sampling under the cudagraphs backend: a graph per span) or "unmarked" (training)
KeyLength = Literal["dynamic", "static", "unmarked"]


def key_length_for_run(compile_kwargs: Mapping[str, Any] | None) -> KeyLength:
    """How a sampling run marks its key length, from how ComfyUI's compile wrapper compiles its U-Net (its keyword
    arguments, model_options["torch_compile_kwargs"]; None: not compiled).

    Static under torch's cudagraphs backend: it records one CUDA graph per compiled graph and size, but tells the
    sizes apart by the graph's integer inputs only, and a length dynamo traces as a symbol is not one of them (it
    is a SymInt when the recording is made). With the length dynamic, a prompt of another span replayed the first
    prompt's recording and copying its keys into it failed ("The size of tensor a (32) must match the size of
    tensor b (96)": H200, torch 2.11, docs/benchmarks.md §5j; pytorch/pytorch#131009). Marked static, dynamo
    traces a graph per span length (a few SPAN_BUCKET lengths), each with its own recording. Inductor's CUDA graphs
    (mode reduce-overhead) key their recordings on the symbols' values: one dynamic graph serves every span."""
    if compile_kwargs and compile_kwargs.get("backend") == "cudagraphs":
        return "static"
    return "dynamic"


def attended_span(mask: torch.Tensor, width: int, bucket: int = SPAN_BUCKET) -> tuple[int, int]:
    """[start, stop): the columns of a [B, <= width] bool key mask that hold every attended token, the
    length rounded up to a multiple of bucket (at most to width). Nothing attended: (0, 1).

    Cut to this span (features.first_tokens(stop)), a mask of `stop` columns has the same span: the
    training step encodes only these tokens and RunMask.prepare finds the span it was cut to."""
    columns = mask.any(dim=0).nonzero().flatten().tolist()
    start, stop = (columns[0], columns[-1] + 1) if columns else (0, 1)
    if bucket > 1:
        stop = start + min(width - start, -(-(stop - start) // bucket) * bucket)
    return start, stop


@dataclass(frozen=True)
class RunMask:
    """Which key tokens each row may attend to, prepared once per run for one U-Net dtype/device,
    over the attended token span only.

    start, stop: the token span [start, stop) that holds every attended token of every row; keys
    outside it are masked for every row, so dropping them is exact (they contribute exp(-inf) = 0).
    With bucket > 1 the span's length is rounded up to a multiple of bucket (at most to the last
    token): a few key lengths over all prompts and training batches instead of one per longest
    prompt, so cuDNN's attention graphs and torch.compile's graphs are built once per bucket, not once
    per prompt length (the extra keys are masked: the same result for a few more attention FLOPs).
    bias: [B, 1, 1, stop-start] additive 0 / -inf in the U-Net dtype (what SDPA makes of a bool mask
          on every call), or None when every row attends to the whole span (no mask at all).
    keep: [B, 1, 1] in the U-Net dtype, 0 for rows without any attended token (they attend to all
          tokens, finite, and their result is zeroed: a path with nothing to attend to contributes
          nothing), or None when every row has one.
    read_stop: the tokens before it are all that hold attended keys (the span's end, = stop unless whole); the
          keys from there to stop are masked for every row, so they need no values (whole: zero padding).
    key_length: how the tensors that hold the key length mark it for torch.compile (mark_key_length): "dynamic"
          or "static" for sampling runs (key_length_for_run), "unmarked" for training calls.
    """

    start: int
    stop: int
    bias: torch.Tensor | None
    keep: torch.Tensor | None
    read_stop: int
    key_length: KeyLength = "unmarked"

    @classmethod
    def prepare(cls, mask: torch.Tensor, dtype: torch.dtype, device: torch.device,
                bucket: int = SPAN_BUCKET, host_mask: torch.Tensor | None = None, whole: bool = False,
                key_length: KeyLength = "unmarked", width: int | None = None) -> RunMask:
        """mask: [B, T] bool, True = the token takes part in attention.

        The span and whether a bias / keep is needed are decided on the host: on host_mask when given (the
        same rows on the CPU, possibly narrower: the missing columns attend to nothing), else on mask
        (a device mask then costs host syncs: fine once per sampling run, not in every training step,
        which passes its batch's host mask). The tensors are then built from mask on the device.

        whole: the span is all `width` columns (default T; wider: the columns past T attend to nothing) and the
        bias is always made: every mask gives the same shapes (a compiled training step then traces one
        graph, not one per span length). Only the tokens before read_stop (the span's end) need values.
        """
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"key mask must be bool [B, T], got {mask.dtype} {tuple(mask.shape)}")
        decide = mask if host_mask is None else host_mask.to("cpu", torch.bool)
        if decide.shape[0] != mask.shape[0] or decide.shape[1] > mask.shape[1]:
            raise ValueError(f"host key mask {tuple(decide.shape)} does not fit the mask {tuple(mask.shape)}")
        rows_have_keys = decide.any(dim=1)
        start, stop = attended_span(decide, mask.shape[1], bucket)
        read_stop = stop
        if whole:
            width = mask.shape[1] if width is None else width
            if width < mask.shape[1]:
                raise ValueError(f"a whole bucket of {width} tokens for a key mask of {mask.shape[1]}")
            start, stop = 0, width
        # rows without keys attend to all (finite), then zeroed; columns beyond a narrower host mask attend to nothing
        needs_keep = not bool(rows_have_keys.all())
        needs_bias = (whole or not bool((decide[:, start:stop] | ~rows_have_keys[:, None]).all())
                      or stop > decide.shape[1])
        keep = bias = None
        if needs_keep or needs_bias:
            mask = mask.to(device)
            has_key = mask.any(dim=1)
            if needs_keep:
                keep = has_key.to(dtype)[:, None, None]
            if needs_bias:
                if stop > mask.shape[1]:  # (whole, wider than the mask) the columns past it attend to nothing
                    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], stop - mask.shape[1])], dim=1)
                span = mask[:, start:stop] | ~has_key[:, None]
                bias = torch.zeros(span.shape, dtype=dtype, device=device).masked_fill_(~span, float("-inf"))
                bias = bias[:, None, None, :]
        made = cls(start, stop, bias, keep, read_stop, key_length=key_length)
        if bias is not None:
            made.mark_key_length(bias, dim=3)
        return made

    def span(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, stop-start, ...]: the tokens attention can read (project only these)."""
        return t[:, self.start:self.stop]

    def heads(self, t: torch.Tensor, heads: int, contiguous: bool = True) -> torch.Tensor:
        """[B, stop-start, H*d] (span() tokens) -> [B, H, stop-start, d]: the keys or values SDPA reads,
        contiguous for keys read every call (the sampling entry gets the same by stacking the views,
        site_stacks.py). A training step reads them once, and SDPA takes the transposed view as ComfyUI's own
        attention passes it: a copy there would be one more kernel per K and V, site and step."""
        b, _, inner = t.shape
        out = t.reshape(b, -1, heads, inner // heads).transpose(1, 2)
        return out.contiguous() if contiguous else out

    def mark_key_length(self, t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """t, its key-length dim marked for torch.compile as self.key_length says.

        "dynamic": the span's length differs between prompts (a few SPAN_BUCKET lengths). Left unmarked, a
        compiled U-Net (TorchCompileModel) traces a static graph for the first prompt and, at the first prompt of
        another length, the whole U-Net again with the length dynamic (minutes for SDXL). Marked, the first
        compile is already the dynamic one. A hint only (maybe_mark_dynamic): nothing fails if the compiler keeps
        the length static after all, and eager code never reads it.
        "static" (the cudagraphs backend, key_length_for_run): a graph per length; torch would otherwise make the
        length dynamic at the second one.
        Tensors derived from marked ones (g * v) are new tensors: mark them too.

        "unmarked" for training calls: there inductor (torch 2.13, CPU) compiled the attention backward of a
        dynamic key length with a static stride, which failed at the next batch's length, marked up front or
        made dynamic by torch at the second length (docs/benchmarks.md §3m). Compiled training attends over the
        whole bucket instead: one static length (--compile-whole-bucket, the default).
        """
        if self.key_length != "unmarked":
            import torch._dynamo  # (already imported by ComfyUI and by torch.compile; lazy for plain torch users)
            if self.key_length == "dynamic":
                torch._dynamo.maybe_mark_dynamic(t, dim)
            else:
                torch._dynamo.mark_static(t, dim)
        return t


def attend(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask: RunMask) -> torch.Tensor:
    """Multi-head attention with prepared keys: q [B, N, H*d], kh / vh [B, H, T', d] (RunMask.heads) -> [B, N, H*d].

    kh and vh are meant to be in q's dtype already (they are cast per call otherwise).
    """
    return attend_with(q, kh, vh, mask.bias, mask.keep)


def attend_with(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, bias: torch.Tensor | None,
                keep: torch.Tensor | None) -> torch.Tensor:
    """attend with a RunMask's bias and keep given as tensors (fused_site's op, where a kernel does not fit)."""
    b, n, inner = q.shape
    heads = kh.shape[1]
    if kh.dtype != q.dtype or vh.dtype != q.dtype:  # not on the prepared path: cast per call
        kh, vh = kh.to(q.dtype), vh.to(q.dtype)
        bias = None if bias is None else bias.to(q.dtype)
        keep = None if keep is None else keep.to(q.dtype)
    qh = q.view(b, n, heads, inner // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias).transpose(1, 2).reshape(b, n, inner)
    if keep is not None:
        out = out * keep
    return out


def fuse_at_core(a_orig: torch.Tensor, scaled_new: torch.Tensor, w_orig: torch.Tensor) -> torch.Tensor:
    """w_orig*A_orig + S, S = w_new*A_new already scaled (before the output projection), in one kernel.

    w_orig is a 0-d tensor (float32 is fine: a 0-d operand does not promote a half tensor): a compiled
    U-Net reads its value rather than recompiling on a Python float (ScaledSites.fusion_weights)."""
    if scaled_new.dtype != a_orig.dtype:  # (a same-dtype .to() is still a dispatch per site and step)
        scaled_new = scaled_new.to(a_orig.dtype)
    return torch.addcmul(scaled_new, a_orig, w_orig)


def fuse_after_out(out: torch.Tensor, scaled_new: torch.Tensor, out_weight: torch.Tensor,
                   out_bias: torch.Tensor | None, w_orig: Gate) -> torch.Tensor:
    """to_out(w_orig*A_orig + S) from out = to_out(A_orig) = W A_orig + b, S = w_new*A_new already
    scaled: w_orig*out + W S + (1 - w_orig)*b (the bias correction of DESIGN.md §1.2). The fallback
    where the fusion cannot happen before to_out."""
    s, weight = scaled_new.to(out.dtype), out_weight.to(out.dtype)
    if isinstance(w_orig, torch.Tensor):
        fused = w_orig * out + F.linear(s, weight)
        return fused if out_bias is None else fused + (1.0 - w_orig) * out_bias.to(out.dtype)
    bias = None if out_bias is None or w_orig == 1.0 else (1.0 - w_orig) * out_bias.to(out.dtype)
    return torch.add(F.linear(s, weight, bias), out, alpha=w_orig)
