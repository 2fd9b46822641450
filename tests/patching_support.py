"""Builders and the literal Eq. 10 reference shared by the patching tests (test_patching.py,
test_run_preparation.py, test_patching_compiled.py, test_fused_site.py, test_host_reads.py and the fused-site
subprocess scripts).

Tiny random U-Nets with the real SD1.5 / SDXL cross-attention layouts (tiny_unets.py), fp32 on CPU.
LLM features are random tensors with realistic masks (BOS and padding masked out): no LLM needed.
The reference for the math is Eq. 10 written out literally per site (forward hooks on the
unpatched model's attn2 modules, explicit softmax attention), independent of the patch code.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
from comfy.ldm.modules.attention import optimized_attention

from llmdiff_core.adapter_runtime import AdapterRuntime, TrainingCall
from llmdiff_core.comfy_patch import applied_runtimes
from llmdiff_core.conditioning import FeatureBatch, attach_features
from llmdiff_core.features import LLMFeatures
from llmdiff_core.model_wrappers import TRAINING_KEY
from llmdiff_core.unet_sites import find_sites
from tiny_unets import (SD15_CONTEXT_DIM, SDXL_ADM_DIM, SDXL_CONTEXT_DIM, make_adapter, make_adapter_config,
                        tiny_llm_spec, tiny_sd15, tiny_sd15_minimal, tiny_sdxl)


SPEC = tiny_llm_spec(hidden_size=48, num_layers=3)
TOKENS = 16  # the LLM token bucket
CLIP_TOKENS = 8
UNETS: dict[str, tuple[Callable[[], Any], int]] = {
    "sd15": (tiny_sd15, SD15_CONTEXT_DIM), "sdxl": (tiny_sdxl, SDXL_CONTEXT_DIM),
    "minimal": (tiny_sd15_minimal, SD15_CONTEXT_DIM),
}


# --- builders ---------------------------------------------------------------------------------------

def make_features(lengths: list[int], seed: int, dtype: torch.dtype = torch.float32,
                  tokens: int = TOKENS) -> LLMFeatures:
    """Prompts with `lengths` real tokens after a (masked) BOS, right-padded to `tokens`."""
    assert max(lengths) < tokens
    g = torch.Generator().manual_seed(seed)
    b, L, D = len(lengths), SPEC.num_layers, SPEC.hidden_size
    mask = torch.zeros(b, tokens, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, 1:1 + n] = True
    return LLMFeatures(SPEC, torch.randn(b, L + 1, tokens, D, generator=g).to(dtype),
                       (0.5 * torch.randn(b, L, tokens, D, generator=g)).to(dtype), mask)


def clip_conditioning(family: str, rows: int, seed: int) -> list[list[Any]]:
    """What CLIPTextEncode gives: [[cond [B, tokens, width], {"pooled_output": [B, 1280]}]]."""
    g = torch.Generator().manual_seed(10_000 + seed)
    width = UNETS[family][1]
    pooled = torch.randn(rows, 1280, generator=g)
    return [[torch.randn(rows, CLIP_TOKENS, width, generator=g), {"pooled_output": pooled}]]


def prompt(family: str, lengths: list[int], seed: int) -> list[list[Any]]:
    return attach_features(clip_conditioning(family, len(lengths), seed), make_features(lengths, seed))


def adapter_for(mp: Any, mode: str = "clip", trained: bool = True, seed: int = 0) -> Any:
    return make_adapter(make_adapter_config(mp, SPEC, original_path=mode), seed=seed, trained=trained, model_patcher=mp)


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def sample(mp: Any, positive: list, negative: list, noise_: torch.Tensor, steps: int = 2,
           cfg: float = 5.0) -> torch.Tensor:
    """comfy.sample.sample (what KSampler runs), under inference_mode like a ComfyUI node."""
    with torch.inference_mode():
        return comfy.sample.sample(mp, noise_, steps, cfg, "euler", "normal", positive, negative,
                                   torch.zeros_like(noise_), denoise=1.0, disable_pbar=True, seed=0)


def diffusion_output(mp: Any, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                     y: torch.Tensor | None, batch: FeatureBatch | None = None,
                     training: TrainingCall | None = None) -> torch.Tensor:
    """One BaseModel.apply_model call with the patcher's options and wrappers, as a sampler makes it
    (with `training`: a training step, with autograd, as training/loop.py makes it)."""
    to = comfy.patcher_extension.copy_nested_dicts(mp.model_options["transformer_options"])
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), mp.wrappers, copy_dict1=False)
    kwargs: dict[str, Any] = {} if y is None else {"y": y}
    if batch is not None:
        kwargs["llmdiff"] = batch
    if training is not None:
        to[TRAINING_KEY] = training
    with torch.set_grad_enabled(training is not None):
        return mp.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to, **kwargs)


def compile_kwargs(backend: str = "inductor", mode: str | None = None, options: dict | None = None) -> dict:
    """What comfy_api.torch_helpers.set_torch_compile_wrapper keeps in model_options["torch_compile_kwargs"]: put
    there alone, a run's site kernel follows them and nothing is compiled."""
    return {"backend": backend, "options": options, "mode": mode, "fullgraph": False, "dynamic": None}


def runtime_of(mp: Any) -> AdapterRuntime:
    return applied_runtimes(mp)[-1]


def count_calls(obj: Any, name: str, counts: dict[str, int], monkeypatch: Any = None) -> None:
    """Counts calls of obj.name (an instance attribute shadows the method). Shared objects (modules) need
    monkeypatch, so the counter goes away with the test."""
    original = getattr(obj, name)
    counts[name] = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return original(*args, **kwargs)

    if monkeypatch is None:
        setattr(obj, name, counted)
    else:
        monkeypatch.setattr(obj, name, counted)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (the tiny random U-Nets' outputs are large)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# --- the literal reference ----------------------------------------------------------------------------

def literal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      mask: torch.Tensor | None) -> torch.Tensor:
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, inner)


def reference_output(mp: Any, adapter: Any, features: LLMFeatures, x: torch.Tensor, sigma: torch.Tensor,
                     context: torch.Tensor, y: torch.Tensor | None, paper: bool) -> torch.Tensor:
    """The unpatched U-Net with every attn2 output replaced by Eq. 10, computed literally:
    to_out(w_orig * Attn(q x, k ctx, v ctx) + w_new * Attn(tau_q x, tau_k c, tau_v c))."""
    with torch.no_grad():
        c = adapter.encode(features)
        mask = features.mask
        w_orig, w_new = adapter.gate_weights()
        if paper:  # CLIP unused: the original path reads phi(c), masked; SDXL's pooled is phi_pool
            phi_c = adapter.original_context(c)
            if y is not None:
                y = torch.cat([adapter.pooled(c, mask), y[:, 1280:]], dim=1)

    def eq10(i: int) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
            h = args[0]
            ctx = phi_c if paper else kwargs["context"]
            a_orig = literal_attention(module.to_q(h), module.to_k(ctx), module.to_v(ctx), module.heads,
                                       mask if paper else None)
            site = adapter.sites[i]
            a_new = literal_attention(site.to_q(h), site.to_k(c), site.to_v(c), module.heads, mask)
            return module.to_out(w_orig[i] * a_orig + w_new[i] * a_new)
        return hook

    modules = find_sites(mp.model.diffusion_model)[1]
    handles = [m.register_forward_hook(eq10(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        return diffusion_output(mp, x, sigma, context, y)
    finally:
        for h in handles:
            h.remove()


def direct_inputs(family: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, CLIP_TOKENS, UNETS[family][1], generator=g)
    y = torch.randn(2, SDXL_ADM_DIM, generator=g) if family == "sdxl" else None
    return x, torch.tensor([3.0, 3.0]), context, y


def half_copy(mp: Any, dtype: torch.dtype) -> Any:
    """The same U-Net stored and run in `dtype` (as ComfyUI runs fp16 / bf16 checkpoints)."""
    model = copy.deepcopy(mp.model)
    model.diffusion_model.to(dtype)
    model.diffusion_model.dtype = dtype  # BaseModel.get_dtype() reads this attribute
    return comfy.model_patcher.ModelPatcher(model, load_device=mp.load_device, offload_device=mp.offload_device)


# --- stand-ins for other packs' attention patches ------------------------------------------------------

class DummyReplace:
    """IP-Adapter-like attn2 replace patch: default attention plus `delta`; counts calls."""

    def __init__(self, delta: float) -> None:
        self.delta, self.calls = delta, 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eo: dict) -> torch.Tensor:
        self.calls += 1
        return optimized_attention(q, k, v, eo["n_heads"]) + self.delta

    def add(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __deepcopy__(self, memo: dict) -> DummyReplace:
        return self


class DummyOutputPatch(DummyReplace):
    """A composable attn2_output_patch that adds `delta`."""

    def __call__(self, out: torch.Tensor, eo: dict) -> torch.Tensor:  # type: ignore[override]
        self.calls += 1
        return out + self.delta


def with_dummy(mp: Any, dummy: DummyReplace) -> Any:
    m = mp.clone()
    if isinstance(dummy, DummyOutputPatch):
        m.set_model_attn2_output_patch(dummy)
    else:
        for spec in find_sites(m.model.diffusion_model)[0]:
            m.set_model_attn2_replace(dummy, spec.block[0], spec.block[1], spec.block_index)
    return m


# --- torch.compile: counting graphs and breaks ---------------------------------------------------------

class GraphCounter:
    """A torch.compile backend that runs dynamo's graphs as they are and counts them and their calls
    (dynamo's tracing, guards and graph breaks are what is tested; no inductor, so seconds)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        index = len(self.calls)
        self.calls.append(0)

        def run(*args: Any) -> Any:
            self.calls[index] += 1
            return gm.forward(*args)
        return run
