"""The per-site math of LLMDiff (DESIGN.md §1.2, Eq. 10) as pure torch functions.

    f_i = w_orig * Attn(q(x), k(ctx), v(ctx)) + w_new * Attn(tau_q(x), tau_k(c), tau_v(c))

Shared by the ComfyUI patch (comfy_patch.py) and training; no ComfyUI import here. Everything is
differentiable, and the gates may be python floats or 0-d tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Gate = float | torch.Tensor


@dataclass(frozen=True)
class KeyMask:
    """Which key tokens each row may attend to, prepared once for scaled_dot_product_attention.

    attn: [B, 1, 1, T] bool (broadcast over heads and queries).
    keep: [B, 1, 1] float, 0 for rows without any attended token, or None when every row has one.
          Such rows attend to all tokens (finite, no NaN) and their result is zeroed: a path with
          nothing to attend to contributes nothing.
    """

    attn: torch.Tensor
    keep: torch.Tensor | None

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> KeyMask:
        """mask: [B, T] bool, True = the token takes part in attention."""
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"key mask must be bool [B, T], got {mask.dtype} {tuple(mask.shape)}")
        has_key = mask.any(dim=1)
        if bool(has_key.all()):
            return cls(mask[:, None, None, :], None)
        safe = mask | ~has_key[:, None]
        return cls(safe[:, None, None, :], has_key.float()[:, None, None])


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     key_mask: KeyMask | None = None) -> torch.Tensor:
    """Multi-head attention of q [B, N, H*d] over k, v [B, T, H*d] -> [B, N, H*d], q's dtype.

    Keys are masked per row. k and v are cast to q's dtype (adapters may be stored in another one).
    """
    b, n, inner = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"attention rows differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    d = inner // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.to(q.dtype).reshape(b, -1, heads, d).transpose(1, 2)
    vh = v.to(q.dtype).reshape(b, -1, heads, d).transpose(1, 2)
    mask = None if key_mask is None else key_mask.attn.to(q.device)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    out = out.transpose(1, 2).reshape(b, n, inner)
    if key_mask is not None and key_mask.keep is not None:
        out = out * key_mask.keep.to(device=out.device, dtype=out.dtype)
    return out


def effective_gates(w_orig: Gate, w_new: Gate, scale: Gate) -> tuple[Gate, Gate]:
    """Gates at strength `scale`: scale 0 is the original path alone (weight 1), 1 is as trained."""
    return 1.0 + scale * (w_orig - 1.0), scale * w_new


def is_identity(w_orig: Gate, w_new: Gate) -> bool:
    """True when the gates leave the original output exactly as it is (nothing to compute)."""
    return (not isinstance(w_orig, torch.Tensor) and not isinstance(w_new, torch.Tensor)
            and w_orig == 1.0 and w_new == 0.0)


def hybrid_output(out: torch.Tensor, a_new: torch.Tensor, out_weight: torch.Tensor,
                  out_bias: torch.Tensor | None, w_orig: Gate, w_new: Gate) -> torch.Tensor:
    """to_out(w_orig*A_orig + w_new*A_new) from out = to_out(A_orig) = W A_orig + b.

    = w_orig*out + W (w_new*A_new) + (1 - w_orig)*b (bias correction, DESIGN.md §1.2). This lets
    the new path ride behind the unmodified original attention call (composable patches).
    """
    fused = w_orig * out + F.linear(w_new * a_new.to(out.dtype), out_weight.to(out.dtype))
    if out_bias is not None:
        fused = fused + (1.0 - w_orig) * out_bias.to(out.dtype)
    return fused


def paper_fusion(a_orig: torch.Tensor, a_new: torch.Tensor, w_orig: Gate, w_new: Gate) -> torch.Tensor:
    """w_orig*A_orig + w_new*A_new, before the original output projection."""
    return w_orig * a_orig + w_new * a_new.to(a_orig.dtype)
