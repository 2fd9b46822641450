"""The LLMDiff adapter (DESIGN.md §1.1 learned part, §1.2 Eq. 10): every trained parameter.

    c       = norm( c_0 + sum_l g_l * s_l  [+ sqrt(2 h_l) eps_l while training] )
    ctx     = phi(c)                                   (paper mode: replaces CLIP)
    f_i     = w_orig_i * Attn(q(x), k(ctx), v(ctx)) + w_new_i * Attn(tq_i(x), tk_i(c), tv_i(c))
    w_orig  = a1 * exp(b1),   w_new = a2 * exp(b2)

Choices where the paper is silent (also in README "Method notes"):
- g_l starts at 1, not 1/T: c then starts as "embeddings + every block's context contribution" at
  the scale of the LLM's own residual stream, and the learned norm takes care of the magnitude.
  With 1/T the context signal would start 1/T smaller than c_0 and mostly drown in it.
- The Langevin terms sum to one Gaussian: sum_l sqrt(2 h_l) eps_l ~ N(0, sum_l 2 h_l), drawn once
  (same distribution and same gradient w.r.t. every rho_l, one random draw instead of L).
- The norm is a LayerNorm over D with affine terms: it tames the LLM's outlier channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, parse_encoding
from .features import LLMFeatures


class SiteProjections(nn.Module):
    """tau_q, tau_k, tau_v of one cross-attention layer (no biases, like SD's own projections)."""

    def __init__(self, query_dim: int, llm_dim: int, inner_dim: int, operations: Any = nn) -> None:
        super().__init__()
        self.to_q = operations.Linear(query_dim, inner_dim, bias=False)
        self.to_k = operations.Linear(llm_dim, inner_dim, bias=False)
        self.to_v = operations.Linear(llm_dim, inner_dim, bias=False)


class ScoreEncoder(nn.Module):
    """The learned half of the text encoding: per-layer weights g_l, noise scales, the norm."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        L, D = config.llm.num_layers, config.llm.hidden_size
        self.mode, self.layer = parse_encoding(config.encoding, L)
        self.c0 = config.c0
        self.gate = nn.Parameter(torch.full((L,), float(config.gate_init)))
        self.rho = nn.Parameter(torch.full((L,), float(config.rho_init)))
        self.norm = nn.LayerNorm(D)

    def noise_scale(self) -> torch.Tensor:
        """sqrt(sum_l 2 h_l), h_l = softplus(rho_l)."""
        return torch.sqrt(2.0 * F.softplus(self.rho.float()).sum())

    def forward(self, features: LLMFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """LLM features -> c [B, T, D] in float32 (padding rows are computed but masked later).

        eps: standard-normal draws [B, T, D] for the Langevin noise (score mode; the caller draws them, so
        each training row comes from its own seed: adapter_runtime.AdapterRuntime._encode); None = no noise."""
        hidden = features.hidden.float()
        if self.mode == "score":
            c = hidden[:, 0] if self.c0 == "embeddings" else torch.zeros_like(hidden[:, 0])
            g = self.gate.float().to(hidden.device)
            c = c + torch.einsum("l,bltd->btd", g, features.scores.float())
            if eps is not None:
                if eps.shape != c.shape:
                    raise ValueError(f"Langevin draws of shape {tuple(eps.shape)} for c of shape {tuple(c.shape)}")
                c = c + self.noise_scale().to(c.device) * eps.to(c)
        elif self.mode == "last":
            c = hidden[:, -1]
        elif self.mode == "mean":
            c = hidden[:, 1:].mean(dim=1)
        else:
            c = hidden[:, self.layer]
        # .to(c.device): under ComfyUI's partial loading these small parameters may stay on the CPU
        return F.layer_norm(c, self.norm.normalized_shape, self.norm.weight.float().to(c.device),
                            self.norm.bias.float().to(c.device), self.norm.eps)


class LLMDiffAdapter(nn.Module):
    """All learned parameters of LLMDiff for one base model + LLM pair.

    `operations` supplies the Linear class (torch.nn, or comfy.ops.* for ComfyUI's weight casting).
    Linear weights of comfy ops start uninitialised: call reset_parameters() or load a state dict.
    """

    def __init__(self, config: AdapterConfig, operations: Any = nn) -> None:
        super().__init__()
        self.config = config
        D = config.llm.hidden_size
        n = len(config.sites)
        self.encoder = ScoreEncoder(config)
        self.phi = operations.Linear(D, config.context_dim) if config.original_path == "llm" else None
        self.phi_pool = operations.Linear(D, 1280) if config.needs_pooled else None
        self.sites = nn.ModuleList(SiteProjections(s.query_dim, D, s.inner_dim, operations) for s in config.sites)
        # Eq. 10 gates, one scalar each per site. a_new = 0: an untrained adapter changes nothing.
        self.a_orig = nn.Parameter(torch.ones(n))
        self.b_orig = nn.Parameter(torch.zeros(n))
        self.a_new = nn.Parameter(torch.zeros(n))
        self.b_new = nn.Parameter(torch.zeros(n))

    # --- initialisation -------------------------------------------------------------------------
    def reset_parameters(self, query_weights: list[torch.Tensor] | None = None) -> None:
        """Fresh init. tau_q copies the frozen U-Net's q projection of its site when given."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.encoder.gate.fill_(self.config.gate_init)
            self.encoder.rho.fill_(self.config.rho_init)
            self.encoder.norm.reset_parameters()
            self.a_orig.fill_(1.0)
            self.b_orig.zero_()
            self.a_new.zero_()
            self.b_new.zero_()
            if query_weights is not None:
                if len(query_weights) != len(self.sites):
                    raise ValueError(f"{len(query_weights)} query weights for {len(self.sites)} sites")
                for site, w in zip(self.sites, query_weights):
                    site.to_q.weight.copy_(w.to(site.to_q.weight))

    def cast_projections(self, dtype: torch.dtype) -> LLMDiffAdapter:
        """The linear projections (every site's tau_q/k/v, phi, phi_pool: all but a few thousand of the
        parameters) to dtype, in place. The gates, g_l, rho and the norm stay as they are: they are tiny
        and the encoder computes in float32 anyway (features, scores and c), so half-precision storage
        cannot overflow there; c is layer-normed before any projection sees it."""
        for module in [*self.sites, self.phi, self.phi_pool]:
            if module is not None:
                module.to(dtype)
        return self

    # --- the method -----------------------------------------------------------------------------
    def gate_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_orig [N], w_new [N]) = (a1 e^b1, a2 e^b2) in float32."""
        return (self.a_orig.float() * torch.exp(self.b_orig.float()),
                self.a_new.float() * torch.exp(self.b_new.float()))

    def encode(self, features: LLMFeatures, eps: torch.Tensor | None = None) -> torch.Tensor:
        """c [B, T, D] (float32); eps: the Langevin noise's draws, see ScoreEncoder.forward."""
        return self.encoder(features, eps=eps)

    def original_context(self, c: torch.Tensor) -> torch.Tensor:
        """Paper mode: phi(c), the context the frozen original cross-attention reads."""
        if self.phi is None:
            raise RuntimeError("original_context() needs an adapter in paper (llm) mode")
        return self.phi(c.to(self.phi.weight.dtype))

    def pooled(self, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SDXL paper mode: phi_pool(mean of c over the attended tokens) -> [B, 1280]."""
        if self.phi_pool is None:
            raise RuntimeError("pooled() needs an SDXL adapter in paper (llm) mode")
        m = mask.to(c.dtype).unsqueeze(-1)
        mean = (c * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.phi_pool(mean.to(self.phi_pool.weight.dtype))

    def site_keys_values(self, i: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tau_k_i(c), tau_v_i(c): [B, T, inner]. Constant over a sampling run."""
        site = self.sites[i]
        if c.dtype != site.to_k.weight.dtype:  # (called per site: no same-dtype .to() dispatch each time)
            c = c.to(site.to_k.weight.dtype)
        return site.to_k(c), site.to_v(c)
