"""LLMDiff inside a real ComfyUI U-Net (llmdiff_core/comfy_patch.py and the modules it wires, attention.py).

Tiny random U-Nets with the real SD1.5 / SDXL cross-attention layouts (tiny_unets.py), fp32 on CPU.
LLM features are random tensors with realistic masks (BOS and padding masked out): no LLM needed.
The reference for the math is Eq. 10 written out literally per site (forward hooks on the
unpatched model's attn2 modules, explicit softmax attention), independent of the patch code.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Callable

import pytest
import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
from comfy.ldm.modules.attention import optimized_attention
from comfy.patcher_extension import WrappersMP

from llmdiff_core.attention import RunMask, attend, attended_span, effective_gates, fuse_after_out, fuse_at_core
from llmdiff_core.adapter_runtime import AdapterRuntime, TrainingCall
from llmdiff_core.comfy_patch import WRAPPER_KEY, applied_runtimes, apply_adapter, forget_kept_entries
from llmdiff_core.conditioning import CONDLLMDiff, FeatureBatch, FeaturePart, attach_features
from llmdiff_core.errors import AdapterMismatchError, LLMDiffError
from llmdiff_core.features import LLMFeatures
from llmdiff_core.model_wrappers import FEATURES_KEY, OVERRIDE_KEY, TRAINING_KEY
from llmdiff_core.unet_sites import find_sites
from cuda_graph_audit import CudaGraphAudit
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


# Which llmdiff_core module calls each function the tests count or replace (count_calls, monkeypatch): a count
# of 0 there proves nothing if another module calls it too.
COUNTED_CALLERS = {"attend": {"adapter_runtime.py"}, "fuse_at_core": {"site_patches.py"},
                   "fuse_after_out": {"site_patches.py"}}


def test_each_counted_function_is_called_from_one_module() -> None:
    import ast
    from pathlib import Path

    import llmdiff_core
    root = Path(llmdiff_core.__file__).parent
    callers: dict[str, set[str]] = {name: set() for name in COUNTED_CALLERS}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in callers:
                    callers[name].add(str(path.relative_to(root)))
    assert callers == COUNTED_CALLERS


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


# --- pure math (attention.py) -------------------------------------------------------------------------

def test_attention_matches_literal_and_empty_rows_give_zero() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0] * 7], dtype=torch.bool)
    rm = RunMask.prepare(mask, torch.float32, torch.device("cpu"))
    out = attend(q, rm.heads(rm.span(k), 2), rm.heads(rm.span(v), 2), rm)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # nothing to attend to: contributes nothing
    torch.testing.assert_close(out[:2], literal_attention(q[:2], k[:2], v[:2], 2, mask[:2]), atol=1e-6, rtol=1e-5)
    full = torch.ones(3, 7, dtype=torch.bool)
    rm = RunMask.prepare(full, torch.float32, torch.device("cpu"))
    assert rm.keep is None and rm.bias is None
    torch.testing.assert_close(attend(q, rm.heads(rm.span(k), 2), rm.heads(rm.span(v), 2), rm),
                               literal_attention(q, k, v, 2, None), atol=1e-6, rtol=1e-5)


def test_fusions_equal_eq10_through_the_output_projection() -> None:
    g = torch.Generator().manual_seed(1)
    to_out = torch.nn.Linear(16, 12)
    a_orig, a_new = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    w_orig, w_new = effective_gates(1.7, 0.6, 0.8)
    assert (w_orig, w_new) == pytest.approx((1.56, 0.48))
    assert effective_gates(1.7, 0.6, 0.0) == (1.0, 0.0)
    want = to_out(w_orig * a_orig + w_new * a_new)
    with torch.no_grad():
        got = fuse_after_out(to_out(a_orig), w_new * a_new, to_out.weight, to_out.bias, w_orig)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(to_out(fuse_at_core(a_orig, w_new * a_new, torch.tensor(w_orig))), want,
                                   atol=1e-6, rtol=1e-5)


# --- Eq. 10 end to end through the U-Net ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["clip", "llm"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_patched_output_is_eq10_at_every_site(family: str, mode: str) -> None:
    mp = UNETS[family][0]()
    adapter = adapter_for(mp, mode)
    features = make_features([5, 11], seed=3)  # two prompts of different lengths, one call
    x, sigma, context, y = direct_inputs(family)
    got = diffusion_output(apply_adapter(mp, adapter), x, sigma, context, y, CONDLLMDiff(features).concat([]))
    want = reference_output(mp, adapter, features, x, sigma, context, y, paper=mode == "llm")
    assert max_rel(got, want) < 1e-5
    assert max_rel(diffusion_output(mp, x, sigma, context, y), want) > 1e-2  # the adapter matters here


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_half_precision_unet_with_fp32_adapter(mode: str, dtype: torch.dtype, tol: float) -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, mode)  # float32 adapter on a half U-Net: the usual mix, no dtype errors
    features = make_features([4, 9], seed=5, dtype=torch.float16)
    x, sigma, context, y = direct_inputs("sd15", seed=1)
    half = half_copy(mp, dtype)
    got = diffusion_output(apply_adapter(half, adapter), x, sigma, context, y, CONDLLMDiff(features).concat([]))
    want = reference_output(mp, adapter, features.to(dtype=torch.float32), x, sigma, context, y, paper=mode == "llm")
    assert torch.isfinite(got).all()
    assert max_rel(got, want) < tol
    assert max_rel(diffusion_output(half, x, sigma, context, y), want) > 4 * tol


def cast_at_call_time_copy(mp: Any, kind: str) -> Any:
    """A copy whose cross-attention weights are made when a layer is called, as ComfyUI does for
    LoRA under lowvram ("lora": weight_function / bias_function) and for weights stored in a
    dtype the U-Net does not compute in ("manual_cast": bf16 storage, fp32 compute)."""
    model = copy.deepcopy(mp.model)
    for attn2 in find_sites(model.diffusion_model)[1]:
        for linear in (attn2.to_k, attn2.to_v, attn2.to_out[0]):
            if kind == "lora":
                linear.weight_function = [lambda w: 1.5 * w]
            else:
                linear.to(torch.bfloat16)
                linear.comfy_cast_weights = True
        if kind == "lora":
            attn2.to_out[0].bias_function = [lambda b: b + 0.1]
    return comfy.model_patcher.ModelPatcher(model, load_device=mp.load_device, offload_device=mp.offload_device)


@pytest.mark.parametrize("kind", ["lora", "manual_cast"])
@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_weights_made_at_call_time_are_the_ones_used(mode: str, kind: str) -> None:
    mp = tiny_sd15_minimal()
    patched_weights = cast_at_call_time_copy(mp, kind)
    adapter = adapter_for(mp, mode)
    features = make_features([7, 2], seed=6)
    x, sigma, context, y = direct_inputs("sd15", seed=2)
    got = diffusion_output(apply_adapter(patched_weights, adapter), x, sigma, context, y,
                           CONDLLMDiff(features).concat([]))
    want = reference_output(patched_weights, adapter, features, x, sigma, context, y, paper=mode == "llm")
    assert max_rel(got, want) < 1e-5
    assert max_rel(reference_output(mp, adapter, features, x, sigma, context, y, paper=mode == "llm"), want) > 1e-4


# --- training mode (TrainingCall) ------------------------------------------------------------------------

PARAMETER_GROUPS = {  # every kind of adapter parameter; per site, every site's
    "clip": ("a_orig", "b_orig", "a_new", "b_new", "encoder.gate", "encoder.rho", "encoder.norm.weight",
             "encoder.norm.bias", "to_q", "to_k", "to_v"),
}
PARAMETER_GROUPS["llm"] = PARAMETER_GROUPS["clip"] + ("phi.weight", "phi.bias")


@pytest.mark.parametrize("family, mode", [("sd15", "clip"), ("sd15", "llm"), ("sdxl", "llm")])
def test_training_call_gives_every_adapter_parameter_a_gradient(family: str, mode: str) -> None:
    mp = UNETS[family][0]()
    adapter = adapter_for(mp, mode)
    features = make_features([5, 11], seed=3)
    x, sigma, context, y = direct_inputs(family)
    m = apply_adapter(mp, adapter)
    out = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]), TrainingCall((7, 8)))
    out.square().mean().backward()
    grads = {name: p.grad for name, p in adapter.named_parameters()}
    missing = [name for name, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    assert not missing  # every parameter of every site, phi_pool (SDXL paper) and the noise scales rho included
    for group in PARAMETER_GROUPS[mode]:
        assert any(group in name for name in grads), group
    n_sites = len(adapter.sites)
    assert all(f"sites.{i}.{proj}.weight" in grads for i in range(n_sites) for proj in ("to_q", "to_k", "to_v"))
    assert all(bool((grads[g] != 0).all()) for g in ("a_orig", "b_orig", "a_new", "b_new"))  # every site's gates


def test_fresh_hybrid_adapter_gets_a_gate_gradient_in_training() -> None:
    """w_new = 0 (a_new = 0): sampling skips the new path, a training step must still move a_new."""
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip", trained=False)
    x, sigma, context, y = direct_inputs("sd15")
    batch = CONDLLMDiff(make_features([5, 11], seed=3)).concat([])
    out = diffusion_output(apply_adapter(mp, adapter), x, sigma, context, y, batch, TrainingCall())
    assert torch.equal(out.detach(), diffusion_output(mp, x, sigma, context, y))  # still the unpatched model
    out.square().mean().backward()
    assert bool((adapter.a_new.grad != 0).all())


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_training_gates_are_worked_out_for_all_sites_at_once_with_the_same_bits(mode: str) -> None:
    """A TrainingCall's gates are [N] tensors: effective_gates runs on the vectors, not per site; the
    result must be the per-site formula's, bit for bit, with gradients."""
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, mode)
    rt = runtime_of(apply_adapter(mp, adapter))
    batch = CONDLLMDiff(make_features([5, 11], seed=3)).concat([])
    entry = rt.entry_for(batch, torch.device("cpu"), torch.float32, TrainingCall())
    w_orig, w_new = adapter.gate_weights()
    n = len(adapter.sites)
    for block_weights in ([1.0] * n, [0.5 + 0.1 * i for i in range(n)]):
        got = entry.scaled_sites(0.7, block_weights)
        for i in range(n):
            wo, wn = effective_gates(w_orig[i], w_new[i], 0.7 * block_weights[i])
            assert torch.equal(got.gates[i][0], wo) and torch.equal(got.gates[i][1], wn)
            assert torch.equal(got.new_values[i], entry.new_kv[i][1] * wn)
            if mode == "llm":
                assert torch.equal(got.orig_values[i], entry.orig_kv[i][1] * wo)
        assert got.new_values[0].requires_grad and got.gates[0][0].requires_grad


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_langevin_noise_only_in_training_calls_and_from_the_row_seeds(mode: str) -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, mode)
    m = apply_adapter(mp, adapter)
    x, sigma, context, y = direct_inputs("sd15")
    batch = CONDLLMDiff(make_features([5, 11], seed=3)).concat([])

    def run(training: TrainingCall | None) -> torch.Tensor:
        torch.manual_seed(len(str(training)))  # the global RNG plays no part
        return diffusion_output(m, x, sigma, context, y, batch, training).detach()

    inference = run(None)
    assert torch.equal(run(None), inference)
    assert max_rel(run(TrainingCall()), inference) < 1e-6  # no seeds: no noise (tensor gates: same to rounding)
    noisy = run(TrainingCall((1, 2)))
    assert max_rel(noisy, inference) > 1e-4
    assert torch.equal(run(TrainingCall((1, 2))), noisy)  # a row's noise comes from its seed alone
    other = run(TrainingCall((1, 3)))
    assert max_rel(other[0], noisy[0]) < 1e-6 and max_rel(other[1], noisy[1]) > 1e-4
    with pytest.raises(ValueError, match="noise seeds"):
        run(TrainingCall((1,)))

    # nothing is cached across training calls, not even inside a sampling run; every site's K/V per call
    runtime = runtime_of(m)
    counts: dict[str, int] = {}
    count_calls(adapter, "encode", counts)
    count_calls(adapter, "site_keys_values", counts)
    runtime.begin_run(m.get_model_object("model_sampling"))
    try:
        run(TrainingCall())
        run(TrainingCall())
        assert runtime.runs.this_run == []
    finally:
        runtime.end_run()
    assert counts == {"encode": 2, "site_keys_values": 2 * len(adapter.sites)}


def test_training_noise_draws_each_row_from_its_seed_and_encodes_the_batch_once() -> None:
    """Row i's Langevin draws are torch.randn from Generator().manual_seed(seed_i), as if the row were encoded
    alone (its noise does not depend on its batch), while the batch is encoded in one call."""
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    rt = runtime_of(apply_adapter(mp, adapter))
    features = make_features([5, 11, 3], seed=4)
    seeds = (11, 12, 13)
    counts: dict[str, int] = {}
    count_calls(adapter, "encode", counts)
    with torch.no_grad():
        got = rt._encode(features, seeds)
        shape = (1, features.num_tokens, features.spec.hidden_size)
        alone = torch.cat([adapter.encoder(features.select([i]), eps=torch.randn(shape, generator=torch.Generator()
                                                                                 .manual_seed(s)))
                           for i, s in enumerate(seeds)])
        clean = rt._encode(features, None)
    assert counts["encode"] == 2  # one per call, not one per row
    torch.testing.assert_close(got, alone, rtol=1e-6, atol=1e-6)
    assert max_rel(got, clean) > 1e-3  # there is noise to compare


# --- sampling: identity, batching, the per-run cache ---------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_fresh_hybrid_adapter_samples_like_the_unpatched_model(family: str) -> None:
    mp = UNETS[family][0]()
    adapter = adapter_for(mp, "clip", trained=False)
    counts: dict[str, int] = {}
    count_calls(adapter, "encode", counts)
    pos, neg = prompt(family, [6], 1), prompt(family, [3], 2)
    out = sample(apply_adapter(mp, adapter), pos, neg, noise(1))
    assert counts["encode"] == 1  # the features did reach the patch
    assert (out - sample(mp, pos, neg, noise(1))).abs().max() <= 1e-6


class Spy:
    """A DIFFUSION_MODEL wrapper inside LLMDiff's: what each U-Net call carries."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, FeatureBatch | None, list[int]]] = []

    def __call__(self, executor: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        to = args[4]
        self.calls.append((x.shape[0], to.get(FEATURES_KEY), list(to["cond_or_uncond"])))
        return executor(x, *args, **kwargs)


def test_batch_of_three_prompts_each_sample_uses_its_own() -> None:
    mp = tiny_sd15_minimal()
    m = apply_adapter(mp, adapter_for(mp))
    spy = Spy()
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "spy", spy)
    clip = clip_conditioning("minimal", 1, 0)[0]  # one CLIP prompt for all: only the LLM features differ
    clip3 = [[clip[0].repeat(3, 1, 1), {"pooled_output": clip[1]["pooled_output"].repeat(3, 1)}]]
    feats = make_features([3, 8, 13], seed=7)
    neg = prompt("minimal", [2], 8)  # one negative, repeated to the batch; another real length
    order = [2, 0, 1]
    out = sample(m, attach_features(clip3, feats), neg, noise(3))
    swapped = sample(m, attach_features(clip3, feats.select(order)), neg, noise(3)[order])
    assert max_rel(swapped, out[order]) < 1e-5
    assert max_rel(out[0], out[1]) > 1e-3 and max_rel(out[1], out[2]) > 1e-3
    # positive and negative (different lengths, same bucket) share every U-Net call
    assert all(rows == 6 and batch is not None and len(batch.parts) == 2 for rows, batch, _ in spy.calls)


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_a_latent_batch_of_one_prompt_encodes_its_rows_once(mode: str) -> None:
    """4 latents of one prompt: ComfyUI repeats the prompt's row per latent (8 U-Net rows with CFG), but c and
    every site's K/V are computed for the 2 distinct rows (positive, negative) and indexed; each image is
    the one sampled alone."""
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, mode)
    encoded: list[int] = []
    encode = adapter.encode

    def counting(features: LLMFeatures, **kwargs: Any) -> torch.Tensor:
        encoded.append(features.batch_size)
        return encode(features, **kwargs)
    adapter.encode = counting
    m = apply_adapter(mp, adapter)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    out = sample(m, pos, neg, noise(4))
    assert encoded == [2]
    for i in range(4):
        assert max_rel(sample(m, pos, neg, noise(4)[i:i + 1]), out[i:i + 1]) < 1e-5


def test_distinct_rows_of_a_feature_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_features([3, 5], seed=1), make_features([4], seed=2)
    batch = FeatureBatch((FeaturePart(a, (1, 1, 0)), FeaturePart(b, (0, 0)), FeaturePart(a, (0,))))
    features, index = batch.distinct()
    assert index == [0, 0, 1, 2, 2, 1]
    assert torch.equal(features.hidden, torch.cat([a.hidden[[1, 0]], b.hidden[[0]]]))
    assert torch.equal(features.mask[index], batch.materialize().mask)
    key_mask, mask_index = batch.distinct_mask()  # the span is decided before any feature is copied
    assert mask_index == index and torch.equal(key_mask, features.mask)
    cut, cut_index = batch.distinct(tokens=3)  # cut before joining: the same rows, 3 tokens
    assert cut_index == index and cut.num_tokens == 3
    for name in ("hidden", "scores", "mask"):
        assert torch.equal(getattr(cut, name), getattr(features.first_tokens(3), name)), name
    joined_on: list[str] = []
    cat = torch.cat

    def watched_cat(tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        joined_on.extend(t.device.type for t in tensors)
        return cat(tensors, *args, **kwargs)
    monkeypatch.setattr(torch, "cat", watched_cat)
    moved, moved_index = batch.distinct(tokens=3, device=torch.device("meta"))  # each part moved, then joined
    assert moved_index == index and moved.scores.device.type == "meta" and moved.scores.shape == cut.scores.shape
    assert joined_on and set(joined_on) == {"meta"}  # no join on the host


def test_cache_once_per_run_same_result_as_recomputing() -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp)
    m = apply_adapter(mp, adapter)
    counts: dict[str, int] = {}
    count_calls(adapter, "encode", counts)
    count_calls(adapter, "site_keys_values", counts)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    steps, sites = 3, len(adapter.sites)

    cached = sample(m, pos, neg, noise(1), steps=steps)
    assert counts == {"encode": 1, "site_keys_values": sites}  # pos + neg: one batched call per step
    runtime_of(m).cache_enabled = False
    recomputed = sample(m, pos, neg, noise(1), steps=steps)
    assert counts == {"encode": 1 + steps, "site_keys_values": sites * (1 + steps)}
    assert torch.equal(cached, recomputed)

    runtime_of(m).cache_enabled = True
    assert torch.equal(sample(m, pos, neg, noise(1), steps=steps), cached)
    assert counts["encode"] == 2 + steps  # the uncached run kept nothing: computed again, once
    runs = runtime_of(m).runs
    assert not runs.active and runs.this_run == [] and len(runs.kept) == 1  # kept for the next run

    new_prompt = prompt("minimal", [6], 99)  # new features: a new object, other values
    assert max_rel(sample(m, new_prompt, neg, noise(1), steps=steps), cached) > 1e-3
    assert counts["encode"] == 3 + steps


def test_a_run_reuses_the_last_runs_entries_while_the_adapter_weights_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI samples again with the same conditioning objects when only the seed (steps, sampler) changes: a
    hybrid run then takes the last run's entry instead of building it, and gives what a fresh runtime gives.
    Weights changed in place (an optimizer step, an EMA copy) or replaced, another prompt in between, or the
    model unloaded by ComfyUI: built again."""
    import comfy.model_management as mm

    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp)
    m = apply_adapter(mp, adapter)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    builds: list[Any] = []
    build = AdapterRuntime._build_entry

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        builds.append(self)
        return build(self, *args, **kwargs)
    monkeypatch.setattr(AdapterRuntime, "_build_entry", spy)

    def fresh(seed: int) -> torch.Tensor:  # a new runtime: nothing kept
        return sample(apply_adapter(mp, adapter), pos, neg, noise(1, seed))

    sample(m, pos, neg, noise(1, 0))
    assert len(builds) == 1
    second = sample(m, pos, neg, noise(1, 1))  # a new seed, the same prompts
    assert len(builds) == 1 and torch.equal(second, fresh(1))
    assert len(builds) == 2  # (fresh's own runtime built its own)
    big = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    sample(m, pos, neg, big, steps=3)  # another size and step count (a hires-fix pass): the same K/V
    assert len(builds) == 2

    with torch.no_grad():  # in place, as an optimizer step or an EMA copy does
        adapter.sites[0].to_k.weight.mul_(1.5)
    changed = sample(m, pos, neg, noise(1, 1))
    assert len(builds) == 3 and torch.equal(changed, fresh(1)) and max_rel(changed, second) > 1e-4
    site = adapter.sites[1].to_v
    monkeypatch.setattr(site, "weight", torch.nn.Parameter(site.weight.detach() * 2))  # a new object
    replaced = sample(m, pos, neg, noise(1, 1))
    assert len(builds) == 5 and torch.equal(replaced, fresh(1)) and max_rel(replaced, changed) > 1e-4
    assert torch.equal(sample(m, pos, neg, noise(1, 0)), fresh(0)) and len(builds) == 7  # (1 kept, 1 fresh)

    other = prompt("minimal", [9], 3)  # another prompt: its entry replaces the kept one (one run's at most)
    sample(m, other, neg, noise(1))
    (kept,) = runtime_of(m).runs.kept
    assert len(builds) == 8 and any(p.features is other[0][1]["model_conds"]["llmdiff"].cond for p in kept.batch.parts)
    sample(m, pos, neg, noise(1))
    assert len(builds) == 9

    assert runtime_of(m).runs.kept
    mm.unload_all_models()  # ComfyUI unloads the model: what was kept (device tensors) goes with it
    assert runtime_of(m).runs.kept == []
    sample(m, pos, neg, noise(1, 0))
    assert len(builds) == 10


def test_paper_mode_builds_each_runs_entry_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paper mode's entry also projects phi(c) with the U-Net's own to_k / to_v, which a LoRA or a lowvram
    weight patch can change between runs unseen: nothing is kept across runs."""
    mp = tiny_sd15_minimal()
    m = apply_adapter(mp, adapter_for(mp, "llm"))
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    counts: dict[str, int] = {}
    count_calls(runtime_of(m).runs, "add", counts)
    sample(m, pos, neg, noise(1))
    sample(m, pos, neg, noise(1))
    assert counts["add"] == 2 and runtime_of(m).runs.kept == []


def test_cache_keeps_prompts_apart_within_a_run(node_classes: dict) -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp)
    m = apply_adapter(mp, adapter)
    counts: dict[str, int] = {}
    count_calls(adapter, "encode", counts)
    set_range = node_classes["ConditioningSetTimestepRange"]().set_range
    # prompt A for the first half of the run, prompt B for the second: two batches, one run
    positive = (set_range(prompt("minimal", [6], 1), 0.0, 0.5)[0] + set_range(prompt("minimal", [9], 3), 0.5, 1.0)[0])
    neg = prompt("minimal", [3], 2)
    cached = sample(m, positive, neg, noise(1), steps=4)
    assert counts["encode"] == 2
    runtime_of(m).cache_enabled = False
    assert torch.equal(sample(m, positive, neg, noise(1), steps=4), cached)


# --- strength, window, block weights ------------------------------------------------------------------

def test_strength_window_and_block_weights() -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)

    def run(steps: int = 2, **kwargs: Any) -> torch.Tensor:
        return sample(apply_adapter(mp, adapter, **kwargs), pos, neg, noise(1), steps=steps)

    unpatched = sample(mp, pos, neg, noise(1))
    assert max_rel(run(), unpatched) > 1e-3
    assert torch.equal(run(strength=0.0), unpatched)
    assert torch.equal(run(start_percent=1.0, end_percent=1.0), unpatched)  # a window the run never reaches
    assert max_rel(run(strength=0.5), run()) > 1e-3
    # one step, taken at progress 0: outside [0.5, 1], inside [0, 0.5]
    assert torch.equal(run(steps=1, start_percent=0.5), sample(mp, pos, neg, noise(1), steps=1))
    assert max_rel(run(steps=1, end_percent=0.5), sample(mp, pos, neg, noise(1), steps=1)) > 1e-3

    layers = {s.transformer_index for s in adapter.config.sites}
    assert torch.equal(run(block_weights=dict.fromkeys(layers, 0.0)), unpatched)
    assert max_rel(run(block_weights={**dict.fromkeys(layers, 0.0), 2: 1.0}), unpatched) > 1e-4
    with pytest.raises(LLMDiffError, match="layers"):
        apply_adapter(mp, adapter, block_weights={len(layers): 1.0})


# --- other attention patches, model checks, missing features -------------------------------------------

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


@pytest.mark.parametrize("kind", [DummyReplace, DummyOutputPatch])
@pytest.mark.parametrize("llmdiff_first", [False, True])
def test_other_attention_patches_still_run(kind: type, llmdiff_first: bool) -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    sites, steps = len(adapter.sites), 2

    def both(dummy: DummyReplace) -> Any:
        if llmdiff_first:
            return with_dummy(apply_adapter(mp, adapter), dummy)
        return apply_adapter(with_dummy(mp, dummy), adapter)

    llmdiff_only = sample(apply_adapter(mp, adapter), pos, neg, noise(1), steps=steps)
    noop = kind(0.0)
    assert max_rel(sample(both(noop), pos, neg, noise(1), steps=steps), llmdiff_only) < 1e-6
    assert noop.calls == sites * steps
    adds = kind(0.05)
    out = sample(both(adds), pos, neg, noise(1), steps=steps)
    assert adds.calls == sites * steps
    assert max_rel(out, llmdiff_only) > 1e-4  # the other patch acts
    assert max_rel(out, sample(with_dummy(mp, kind(0.05)), pos, neg, noise(1), steps=steps)) > 1e-4  # and so do we


def test_paper_mode_refuses_replace_patches_both_ways() -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "llm")
    with pytest.raises(LLMDiffError, match="hybrid"):
        apply_adapter(with_dummy(mp, DummyReplace(0.0)), adapter)
    m = apply_adapter(mp, adapter)
    key = adapter.config.sites[0].key
    with pytest.raises(LLMDiffError, match="IP-Adapter"):  # what IPAdapter_plus does next
        m.model_options["transformer_options"]["patches_replace"]["attn2"][key].add(lambda *a: None)


def test_adapter_for_another_base_model_is_refused() -> None:
    sdxl_adapter = adapter_for(tiny_sdxl())
    with pytest.raises(AdapterMismatchError, match="SDXL"):
        apply_adapter(tiny_sd15(), sdxl_adapter)


def test_negative_without_llm_features() -> None:
    mp = tiny_sd15_minimal()
    pos, plain_neg = prompt("minimal", [6], 1), clip_conditioning("minimal", 1, 2)
    hybrid = sample(apply_adapter(mp, adapter_for(mp, "clip")), pos, plain_neg, noise(1))
    assert torch.isfinite(hybrid).all()
    assert max_rel(hybrid, sample(mp, pos, plain_neg, noise(1))) > 1e-3  # the positive still uses it
    with pytest.raises(LLMDiffError, match="negative conditioning carries no LLM features"):
        sample(apply_adapter(mp, adapter_for(mp, "llm")), pos, plain_neg, noise(1))


def test_stacked_hybrid_adapters_both_act() -> None:
    mp = tiny_sd15_minimal()
    first, second = adapter_for(mp, seed=1), adapter_for(mp, seed=2)
    counts: dict[str, int] = {}
    count_calls(second, "encode", counts)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    stacked = apply_adapter(apply_adapter(mp, first), second)
    out = sample(stacked, pos, neg, noise(1))
    assert counts["encode"] == 1  # the inner adapter found the features the outer one took
    assert [p.model for p in stacked.get_additional_models_with_key(WRAPPER_KEY)] == [first, second]
    assert max_rel(out, sample(apply_adapter(mp, first), pos, neg, noise(1))) > 1e-4
    assert max_rel(out, sample(apply_adapter(mp, second), pos, neg, noise(1))) > 1e-4


def patch_objects(mp: Any) -> list[Any]:
    to = mp.model_options["transformer_options"]
    return ([p for ps in to["patches"].values() for p in ps]
            + list(to.get("patches_replace", {}).get("attn2", {}).values()))


def test_patches_are_shared_by_clones_and_have_no_to() -> None:
    mp = tiny_sd15_minimal()
    for mode in ("clip", "llm"):
        m = apply_adapter(mp, adapter_for(mp, mode))
        objects, cloned_objects = patch_objects(m), patch_objects(m.clone())  # 0.3.75 deep-copies on clone
        assert objects and all(a is b for a, b in zip(objects, cloned_objects, strict=True))
        assert not any(hasattr(p, "to") for p in objects)
        assert "patches" not in mp.model_options["transformer_options"]  # the input MODEL is untouched


# --- once-per-run preparation and the fusion at the attention core (issue 5) ---------------------------

def test_prepared_mask_trims_to_the_attended_span_exactly() -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(3, 5, 16, generator=g), torch.randn(3, 9, 16, generator=g), torch.randn(3, 9, 16, generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 1:3], mask[1, 1:6] = True, True  # row 2: nothing to attend to; tokens 0 and 6.. unused by all
    rm = RunMask.prepare(mask, torch.float32, torch.device("cpu"), bucket=1)
    assert (rm.start, rm.stop) == (1, 6)
    assert rm.bias is not None and rm.bias.dtype == torch.float32 and rm.keep is not None
    out = attend(q, rm.heads(rm.span(k), 2), rm.heads(rm.span(v), 2), rm)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    torch.testing.assert_close(out[:2], literal_attention(q[:2], k[:2], v[:2], 2, mask[:2]), atol=1e-6, rtol=1e-5)
    full_span = torch.zeros(3, 9, dtype=torch.bool)
    full_span[:, 2:7] = True  # every row attends to the whole span: no mask at all
    rm = RunMask.prepare(full_span, torch.float16, torch.device("cpu"), bucket=1)
    assert rm.bias is None and rm.keep is None and rm.heads(rm.span(k), 2).shape == (3, 2, 5, 8)
    torch.testing.assert_close(attend(q, rm.heads(rm.span(k), 2), rm.heads(rm.span(v), 2), rm),
                               literal_attention(q, k, v, 2, full_span), atol=1e-6, rtol=1e-5)
    nothing = RunMask.prepare(torch.zeros(2, 9, dtype=torch.bool), torch.float32, torch.device("cpu"))
    out = attend(q[:2], nothing.heads(nothing.span(k[:2]), 2), nothing.heads(nothing.span(v[:2]), 2), nothing)
    assert torch.equal(out, torch.zeros_like(out))


def test_prepared_span_comes_in_buckets_and_computes_the_same() -> None:
    """Key lengths are multiples of the bucket (or reach the last token): prompts and training batches of
    different lengths share the attention's shapes; the padded keys are masked, the result is exact."""
    g = torch.Generator().manual_seed(5)
    T = 80
    q, k, v = torch.randn(2, 5, 16, generator=g), torch.randn(2, T, 16, generator=g), torch.randn(2, T, 16, generator=g)
    spans = set()
    for longest in (3, 20, 33, 50, 63, 64, 79):
        mask = torch.zeros(2, T, dtype=torch.bool)
        mask[0, 1:longest + 1], mask[1, 1:3] = True, True
        rm = RunMask.prepare(mask, torch.float32, torch.device("cpu"), bucket=32)
        length = rm.stop - rm.start
        assert rm.start == 1 and (length % 32 == 0 or rm.stop == T) and rm.stop > longest
        assert rm.bias is not None
        spans.add(length)
        torch.testing.assert_close(attend(q, rm.heads(rm.span(k), 2), rm.heads(rm.span(v), 2), rm),
                                   literal_attention(q, k, v, 2, mask), atol=1e-6, rtol=1e-5)
    assert spans == {32, 64, T - 1}


def test_prepared_mask_decides_on_the_host_mask_without_reading_the_device_one() -> None:
    """Training passes its batch's key mask on the host (narrower than the padded device mask: the batch's
    longest caption): the same span, bias and keep, and the device mask is computed with, never read. A meta
    tensor stands in for it: .tolist(), bool() or nonzero() on it raise, as each is a host sync on a GPU."""
    T = 80
    for rows in ([(1, 40), (1, 3)], [(1, 40), None], [(2, 34), (2, 34)], [None, None]):
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                mask[i, r[0]:r[1]] = True
        want = RunMask.prepare(mask, torch.float32, torch.device("cpu"))
        got = RunMask.prepare(mask, torch.float32, torch.device("cpu"), host_mask=mask[:, :41])
        assert (got.start, got.stop) == (want.start, want.stop), rows
        for a, b in ((got.bias, want.bias), (got.keep, want.keep)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), rows
        meta = RunMask.prepare(mask.to("meta"), torch.float32, torch.device("meta"), host_mask=mask[:, :41])
        assert (meta.start, meta.stop) == (want.start, want.stop)
        assert (meta.bias is None) == (want.bias is None) and (meta.keep is None) == (want.keep is None)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the stand-in works: deciding on it reads it
        RunMask.prepare(mask.to("meta"), torch.float32, torch.device("meta"))
    with pytest.raises(ValueError, match="does not fit"):
        RunMask.prepare(mask, torch.float32, torch.device("cpu"), host_mask=mask[:1])


def test_a_mask_cut_to_its_attended_span_has_the_same_span() -> None:
    """Cut to attended_span's stop (the training step expands and encodes only that far), a mask gives the span,
    bias and keep of the whole mask: nothing after stop is needed."""
    g = torch.Generator().manual_seed(6)
    T = 80
    for trial in range(40):
        B = 1 + trial % 3
        mask = torch.rand(B, T, generator=g) < 0.3
        last = int(torch.randint(1, T + 1, (1,), generator=g))
        mask[:, last:] = False
        if trial % 7 == 0:
            mask[0] = False  # a row with nothing to attend to
        start, stop = attended_span(mask, T)
        want = RunMask.prepare(mask, torch.float32, torch.device("cpu"))  # (its span is attended_span's)
        cut = RunMask.prepare(mask[:, :stop], torch.float32, torch.device("cpu"), host_mask=mask[:, :min(last, stop)])
        assert (cut.start, cut.stop) == (start, stop), trial
        for a, b in ((cut.bias, want.bias), (cut.keep, want.keep)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), trial


def padded_features(features: LLMFeatures, tokens: int) -> LLMFeatures:
    """The same prompts in a wider token bucket (zero padding, masked)."""
    b, l1, t, d = features.hidden.shape
    hidden, scores = torch.zeros(b, l1, tokens, d), torch.zeros(b, l1 - 1, tokens, d)
    mask = torch.zeros(b, tokens, dtype=torch.bool)
    hidden[:, :, :t], scores[:, :, :t], mask[:, :t] = features.hidden, features.scores, features.mask
    return LLMFeatures(features.spec, hidden, scores, mask)


@pytest.mark.parametrize("family, mode", [("minimal", "clip"), ("minimal", "llm"), ("sdxl", "llm")])
def test_only_the_tokens_up_to_the_attended_span_are_encoded(family: str, mode: str) -> None:
    """Prompts of 5 and 11 tokens in an 80-token bucket attend to the span [1, 33): c, phi(c) and every K/V
    are computed for the first 33 tokens only, with the values the whole bucket's encoding has there (and
    SDXL paper mode's pooled vector, the mean of c over the attended tokens, is the same)."""
    mp = UNETS[family][0]()
    adapter = adapter_for(mp, mode)
    rt = runtime_of(apply_adapter(mp, adapter))
    features = padded_features(make_features([5, 11], seed=3), 80)
    widths: list[int] = []
    adapter.encoder.register_forward_pre_hook(lambda module, args, kwargs: widths.append(args[0].num_tokens),
                                              with_kwargs=True)
    batch = CONDLLMDiff(features).concat([])
    with torch.no_grad():
        entry = rt.entry_for(batch, torch.device("cpu"), torch.float32)
        assert widths == [33] and entry.c.shape[1] == 33 and (entry.mask.start, entry.mask.stop) == (1, 33)
        torch.testing.assert_close(entry.c, adapter.encode(features)[:, :33], rtol=1e-6, atol=1e-6)
        assert (entry.pooled is not None) == (family == "sdxl")
        if entry.pooled is not None:
            torch.testing.assert_close(entry.pooled, adapter.pooled(adapter.encode(features), features.mask),
                                       rtol=1e-6, atol=1e-6)
        noisy = rt.entry_for(batch, torch.device("cpu"), torch.float32, TrainingCall((7, 8)))
        whole = rt._encode(features, (7, 8))  # the draws over the whole bucket
        torch.testing.assert_close(noisy.c, whole[:, :33], rtol=1e-6, atol=1e-6)
    # sampling reads each K/V every step: laid out for SDPA once; a training step reads them once: views
    # of the projections (no copy kernel per K and V, site and step)
    assert all(t.is_contiguous() for kv in entry.new_kv for t in kv)
    assert not any(t.is_contiguous() for kv in noisy.new_kv for t in kv)
    assert all(t.stride(-1) == 1 for kv in noisy.new_kv for t in kv)


def test_a_training_batch_cut_short_trains_as_the_whole_bucket_with_draws_at_the_bucket(monkeypatch: Any) -> None:
    """What the trainer does with cached features: the batch arrives only as wide as its attended span needs
    (TrainingCall.noise_tokens = the bucket), and the step is the one on the whole bucket's features. The
    Langevin draws must be made at the bucket and cut, so that the loss cannot depend on the batch's longest
    caption on any generator. (Today's CPU draw keeps its prefix when the size is a multiple of 16, and the
    H100 run of session 10 found CUDA's does too, so the values cannot show it: the shapes are checked.)"""
    shapes: list[tuple[int, ...]] = []
    randn = torch.randn

    def recording_randn(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = randn(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch, "randn", recording_randn)
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    m = apply_adapter(mp, adapter)
    x, sigma, context, y = direct_inputs("sd15")
    features = padded_features(make_features([5, 11], seed=3), 80)
    whole = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]), TrainingCall((7, 8))).detach()
    cut = CONDLLMDiff(features.first_tokens(40)).concat([])
    host = features.mask[:, :12]
    shapes.clear()
    got = diffusion_output(m, x, sigma, context, y, cut, TrainingCall((7, 8), host, noise_tokens=80)).detach()
    assert shapes == [(1, 80, SPEC.hidden_size)] * 2
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-5)
    shapes.clear()
    diffusion_output(m, x, sigma, context, y, cut, TrainingCall((7, 8), host))  # no bucket given: the batch's width
    assert shapes == [(1, 40, SPEC.hidden_size)] * 2
    with pytest.raises(ValueError, match="Langevin draws over 20 tokens"):
        diffusion_output(m, x, sigma, context, y, cut, TrainingCall((7, 8), host, noise_tokens=20))
    # a compiled trainer's call (whole_bucket): attended over all 80 tokens, the same step; only the span's
    # tokens are encoded (the keys past it are zero padding, masked), from the whole batch or one cut to 40
    encoded: list[int] = []
    encode = adapter.encode

    def recording_encode(f: LLMFeatures, *args: Any, **kwargs: Any) -> torch.Tensor:
        encoded.append(f.num_tokens)
        return encode(f, *args, **kwargs)
    monkeypatch.setattr(adapter, "encode", recording_encode)
    for given in (CONDLLMDiff(features).concat([]), cut):
        shapes.clear()
        over_all = diffusion_output(m, x, sigma, context, y, given,
                                    TrainingCall((7, 8), host, noise_tokens=80, whole_bucket=True)).detach()
        assert shapes == [(1, 80, SPEC.hidden_size)] * 2
        torch.testing.assert_close(over_all, whole, rtol=1e-6, atol=1e-5)
    assert encoded == [33, 33]
    spans = []
    entry_for = AdapterRuntime.entry_for

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = entry_for(self, *args, **kwargs)
        spans.append((entry.mask.start, entry.mask.stop, entry.mask.read_stop, entry.c.shape[1],
                      entry.new_kv[0][0].shape[2]))
        return entry
    monkeypatch.setattr(AdapterRuntime, "entry_for", spy)
    diffusion_output(m, x, sigma, context, y, cut, TrainingCall((7, 8), host, noise_tokens=80, whole_bucket=True))
    diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]), TrainingCall((7, 8), features.mask))
    # the whole bucket (80 keys, 33 of them encoded), against the span (rounded to 32 tokens)
    assert spans == [(0, 80, 33, 80, 80), (1, 33, 33, 33, 32)]


@pytest.mark.slow
def test_inductor_trains_batches_of_any_caption_length_as_eager() -> None:
    """--compile-unet inductor as the trainer runs it (over the whole token bucket: --compile-whole-bucket, the
    default), over batches whose captions span 96, 64 and 32 keys: inductor's generated code checks its
    inputs' sizes and strides, which dynamo alone (the tests above) does not run. One static graph gives the
    eager outputs and the eager gradients of every adapter weight.

    Over the span instead (--no-compile-whole-bucket), inductor on the CPU (torch 2.13) compiled the second,
    dynamic graph with a static stride for the key length, and the third span length failed its assert
    (docs/benchmarks.md §3m); not tested here, as it fails."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    eager = apply_adapter(mp, adapter)
    compiled = apply_adapter(mp, adapter)
    set_torch_compile_wrapper(compiled, backend="inductor")
    x, sigma, context, y = direct_inputs("sd15")
    g = torch.Generator().manual_seed(5)
    torch._dynamo.reset()
    try:
        for step, lengths in enumerate([[70, 90], [40, 50], [10, 20]]):
            mask = torch.zeros(2, 128, dtype=torch.bool)
            for row, n in enumerate(lengths):
                mask[row, 1:1 + n] = True
            features = LLMFeatures(SPEC, torch.randn(2, SPEC.num_layers + 1, 128, SPEC.hidden_size, generator=g),
                                   torch.randn(2, SPEC.num_layers, 128, SPEC.hidden_size, generator=g), mask)
            grads = []
            for m in (eager, compiled):
                adapter.zero_grad(set_to_none=True)
                out = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]),
                                       TrainingCall((step, 99), mask, 128, whole_bucket=True))
                out.square().mean().backward()
                grads.append((out.detach(), [p.grad.clone() for p in adapter.parameters() if p.grad is not None]))
            (want, want_grads), (got, got_grads) = grads
            assert max_rel(got, want) < 1e-4, step
            assert len(got_grads) == len(want_grads) > 0
            for a, b in zip(got_grads, want_grads):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_torch_compile_model_before_apply_llmdiff_compiles_the_patches_too(mode: str) -> None:
    """A graph may put TorchCompileModel before Apply LLMDiff: the compile wrapper is then the outer one,
    and the U-Net it compiles still runs the adapter's patches in one graph, with the eager result."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, mode)
    compiled_first = mp.clone()
    backend = GraphCounter()
    set_torch_compile_wrapper(compiled_first, backend=backend)
    m = apply_adapter(compiled_first, adapter)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    torch._dynamo.reset()
    counters.clear()
    try:
        out = sample(m, pos, neg, noise(1), steps=3)
        assert backend.calls == [3], backend.calls
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert max_rel(out, sample(apply_adapter(mp, adapter), pos, neg, noise(1), steps=3)) < 1e-6
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["minimal", "sdxl"])
def test_a_whole_bucket_step_is_the_span_step_in_paper_mode(family: str) -> None:
    """A whole-bucket training call (what --compile-unet runs) on a batch cut to 40 of 80 tokens attends over all
    80 keys, the ones past the span zero padding, and gives the span's step in paper mode too: phi(c)'s K/V
    over the padding, SDXL's pooled vector from the unpadded c. (Hybrid mode: the test above.)"""
    mp = UNETS[family][0]()
    m = apply_adapter(mp, adapter_for(mp, "llm"))
    x, sigma, context, y = direct_inputs(family)
    features = padded_features(make_features([5, 11], seed=3), 80)
    span = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]),
                            TrainingCall((7, 8), features.mask, 80)).detach()
    whole = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features.first_tokens(40)).concat([]),
                             TrainingCall((7, 8), features.mask[:, :12], 80, whole_bucket=True)).detach()
    torch.testing.assert_close(whole, span, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("whole_bucket", [False, True], ids=["span", "whole bucket"])
def test_compiled_training_calls_trace_at_most_twice_over_the_span_buckets(whole_bucket: bool) -> None:
    """Training batches attend to spans of 32, 64, 96 or 127 keys (SPAN_BUCKET in a 128-token bucket) and their
    c is encoded only that far: the compiled U-Net (ComfyUI's torch.compile wrapper, what --compile-unet sets;
    aot_eager traces forward and backward) traces a static graph, then one with the key length dynamic, and no
    more: no recompilation per batch and no graph break, whatever the captions' lengths. Over the whole
    bucket (TrainingCall.whole_bucket, what the trainer asks for when it compiles) it traces one graph.
    (Training does not mark the key length dynamic up front, as sampling does: RunMask.varying_keys.)"""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    m = apply_adapter(mp, adapter)
    set_torch_compile_wrapper(m, backend="aot_eager")
    x, sigma, context, y = direct_inputs("sd15")
    g = torch.Generator().manual_seed(11)
    torch._dynamo.reset()
    counters.clear()
    try:
        for step, lengths in enumerate([[10, 20], [40, 50], [70, 90], [120, 5], [10, 20], [60, 30]]):
            mask = torch.zeros(2, 128, dtype=torch.bool)
            for row, n in enumerate(lengths):
                mask[row, 1:1 + n] = True
            features = LLMFeatures(SPEC, torch.randn(2, SPEC.num_layers + 1, 128, SPEC.hidden_size, generator=g),
                                   torch.randn(2, SPEC.num_layers, 128, SPEC.hidden_size, generator=g), mask)
            batch = CONDLLMDiff(features).concat([])
            out = diffusion_output(m, x, sigma, context, y, batch, TrainingCall((step, 99), mask, 128, whole_bucket))
            out.square().mean().backward()
        assert counters["stats"]["unique_graphs"] == (1 if whole_bucket else 2), dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode, backend", [("clip", "dynamo"), ("llm", "dynamo"),
                                           pytest.param("clip", "inductor", marks=pytest.mark.slow)])
def test_compiled_sampling_traces_one_graph_for_prompts_of_any_length(mode: str, backend: str,
                                                                       monkeypatch: Any) -> None:
    """Prompts of 6, 40 and 70 tokens in an 80-token bucket attend to 32, 64 and 79 keys (RunMask's span buckets).
    The per-run K/V, values and mask carry that length as a dynamic dim (RunMask.varying_keys), so the compiled
    U-Net (TorchCompileModel) traces once for all of them: no second, dynamic compile of the whole U-Net when a
    longer prompt comes (minutes for SDXL), and every image is the eager one. With inductor too, whose
    generated code checks its inputs' sizes and strides (in training it failed on them: varying_keys)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    mp = tiny_sd15_minimal()
    m = apply_adapter(mp, adapter_for(mp, mode))
    c = m.clone()
    set_torch_compile_wrapper(c, backend=GraphCounter() if backend == "dynamo" else backend)
    neg = attach_features(clip_conditioning("minimal", 1, 2), make_features([3], 2, tokens=80))
    keys = []
    build = AdapterRuntime._build_entry

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = build(self, *args, **kwargs)
        keys.append(entry.new_kv[0][0].shape[2])
        return entry
    monkeypatch.setattr(AdapterRuntime, "_build_entry", spy)
    torch._dynamo.reset()
    counters.clear()
    try:
        for seed, length in enumerate([6, 40, 70, 20]):
            pos = attach_features(clip_conditioning("minimal", 1, seed), make_features([length], seed, tokens=80))
            out = sample(c, pos, neg, noise(1), steps=2)
            forget_kept_entries(m)  # (c shares m's runtime: the eager run builds its own entry, not c's)
            assert max_rel(out, sample(m, pos, neg, noise(1), steps=2)) < (1e-6 if backend == "dynamo" else 1e-4)
        assert keys == [32, 32, 64, 64, 79, 79, 32, 32]  # (compiled, eager) per prompt
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


class CountingOverride:
    """Another pack's optimized_attention_override: passes through, counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return func(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> CountingOverride:
        return self


@pytest.mark.parametrize("path", ["core", "core_chained", "after_out"])
def test_hybrid_fuses_at_the_attention_core_without_a_second_projection(path: str, monkeypatch: Any) -> None:
    import llmdiff_core.adapter_runtime as runtime
    import llmdiff_core.site_patches as patches
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    features = make_features([5, 11], seed=3)
    x, sigma, context, y = direct_inputs("sd15")
    counts: dict[str, int] = {}
    count_calls(patches, "fuse_after_out", counts, monkeypatch)  # the fallback's extra output projection
    count_calls(patches, "fuse_at_core", counts, monkeypatch)
    if path == "after_out":  # a ComfyUI without the core override
        monkeypatch.setattr(runtime, "CORE_OVERRIDE_SUPPORTED", False)
    base = mp
    other = CountingOverride()
    if path == "core_chained":
        base = mp.clone()
        base.model_options["transformer_options"][OVERRIDE_KEY] = other
    m = apply_adapter(base, adapter)
    got = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]))
    want = reference_output(mp, adapter, features, x, sigma, context, y, paper=False)
    assert max_rel(got, want) < 1e-5
    sites = len(adapter.sites)
    if path == "after_out":
        assert counts == {"fuse_after_out": sites, "fuse_at_core": 0}
    else:
        assert counts == {"fuse_after_out": 0, "fuse_at_core": sites}
    if path == "core_chained":
        assert other.calls == 2 * sites  # attn1 and attn2 of every block still go through it
        assert OVERRIDE_KEY not in mp.model_options["transformer_options"]
    # strength 0: no override is installed at all, the unpatched model bit for bit
    assert torch.equal(diffusion_output(apply_adapter(mp, adapter, strength=0.0), x, sigma, context, y,
                                        CONDLLMDiff(features).concat([])), diffusion_output(mp, x, sigma, context, y))


def test_replace_patch_site_fuses_before_to_out(monkeypatch: Any) -> None:
    """A site occupied by a replace patch (IP-Adapter): Eq. 10 with the replace's output as A_orig, before to_out."""
    import llmdiff_core.site_patches as patches
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    features = make_features([5, 11], seed=3)
    x, sigma, context, y = direct_inputs("sd15")
    counts: dict[str, int] = {}
    count_calls(patches, "fuse_after_out", counts, monkeypatch)
    dummy = DummyReplace(0.0)
    got = diffusion_output(apply_adapter(with_dummy(mp, dummy), adapter), x, sigma, context, y,
                           CONDLLMDiff(features).concat([]))
    assert dummy.calls == len(adapter.sites) and counts["fuse_after_out"] == 0
    assert max_rel(got, reference_output(mp, adapter, features, x, sigma, context, y, paper=False)) < 1e-5


def test_once_per_run_work_is_prepared_in_the_unet_dtype() -> None:
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")  # float32 adapter
    half = half_copy(mp, torch.float16)
    m = apply_adapter(half, adapter)
    rt = runtime_of(m)
    features = make_features([4, 9], seed=5)
    entry = rt.entry_for(CONDLLMDiff(features).concat([]), torch.device("cpu"), torch.float16)
    assert all(w.dtype == torch.float16 for w in entry.q_weights)
    # attended tokens 1..9 of the 16-token bucket: the span's length rounds up to 32, so it reaches token 15
    assert all(k.dtype == torch.float16 and k.shape[2] == 15 for k, _ in entry.new_kv)
    assert entry.mask.bias is not None and entry.mask.bias.dtype == torch.float16
    assert adapter.sites[0].to_q.weight.dtype == torch.float32  # the adapter itself is untouched

    class NoRead(torch.Tensor):
        def __float__(self) -> float:
            raise AssertionError("sigmas read (a device->host sync on a GPU)")

    sigmas = torch.tensor([3.0]).as_subclass(NoRead)
    assert rt.is_active(sigmas)  # the default window 0..1: always active, sigmas not read
    windowed = runtime_of(apply_adapter(mp, adapter, start_percent=0.5))
    assert windowed.is_active(torch.tensor([0.0])) and not windowed.is_active(torch.tensor([1e6]))


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_partially_loaded_adapter_computes_the_same(mode: str, tmp_path: Any) -> None:
    """Adapter Loader builds the adapter from comfy.ops layers, so when memory is short ComfyUI can load it
    partially (layers offloaded, weights fetched per call, like the U-Net's) instead of leaving plain torch
    layers on the CPU to meet GPU inputs. Loaded that way (the loader's own code, from a file) it computes
    exactly what the plain one does."""
    from llmdiff_core.adapter_file import save_adapter
    from llmdiff_core.comfy_adapter import load_for_inference

    mp = tiny_sd15_minimal()
    plain = adapter_for(mp, mode)
    path = save_adapter(plain, tmp_path / "adapter.safetensors")
    layered = load_for_inference(path, "fp32")
    features = make_features([5, 11], seed=3)
    x, sigma, context, y = direct_inputs("sd15")
    want = diffusion_output(apply_adapter(mp, plain), x, sigma, context, y, CONDLLMDiff(features).concat([]))
    m = apply_adapter(mp, layered)
    (adapter_patcher,) = m.get_additional_models_with_key(WRAPPER_KEY)
    adapter_patcher.load(device_to=torch.device("cpu"), lowvram_model_memory=1)  # what ComfyUI does when short
    linears = [l for l in layered.modules() if isinstance(l, torch.nn.Linear)]
    assert linears and all(l.comfy_cast_weights for l in linears)  # every layer offloaded, cast per call
    got = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]))
    assert max_rel(got, want) < 1e-6


# --- torch.compile (ComfyUI's TorchCompileModel) ------------------------------------------------------

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


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_compiled_patched_unet_can_run_as_cuda_graphs(mode: str) -> None:
    """What the patches put into the compiled U-Net keeps it capturable as CUDA graphs (TorchCompileModel
    with mode reduce-overhead, or backend cudagraphs: the launch-bound sampling step's remedy): no op CUDA
    graphs refuse, every input a tensor or a size, and no input written to (the per-run keys, values, gates
    and mask are only read; a write would make inductor skip CUDA graphs for the whole U-Net)."""
    audit, out, want = product_audit(mode)
    assert max_rel(out, want) < 1e-6
    graphs = audit.graphs
    assert graphs == [{"incompatible op": None, "non-tensor inputs": [], "mutated inputs": []}], graphs


def test_cuda_graph_audit_sees_a_write_to_the_cached_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit above can fail: an in-place op on a site's cached keys is a write to a graph input."""
    import llmdiff_core.adapter_runtime as runtime

    def attend_that_writes(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask: Any) -> torch.Tensor:
        kh.mul_(1.0)
        return attend(q, kh, vh, mask)
    monkeypatch.setattr(runtime, "attend", attend_that_writes)
    graphs = audited_compiled_sampling("clip")[0].graphs
    # the minimal U-Net's 7 sites read their keys from 2 stacks (two head widths): each is a graph input written to
    assert len(graphs) == 1 and len(graphs[0]["mutated inputs"]) == 2, graphs


def audited_compiled_sampling(mode: str | None) -> tuple[CudaGraphAudit, torch.Tensor, torch.Tensor]:
    """The CudaGraphAudit of a compiled sampling run of the minimal U-Net patched in `mode` (None: unpatched), its
    image and the eager one."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    mp = tiny_sd15_minimal()
    m = mp if mode is None else apply_adapter(mp, adapter_for(mp, mode))
    audit = CudaGraphAudit()
    compiled = m.clone()
    set_torch_compile_wrapper(compiled, backend=audit.backend)
    pos, neg = prompt("minimal", [6], 1), prompt("minimal", [3], 2)
    torch._dynamo.reset()
    try:
        out = sample(compiled, pos, neg, noise(1), steps=2)
    finally:
        torch._dynamo.reset()
    return audit, out, sample(m, pos, neg, noise(1), steps=2)


@functools.cache
def product_audit(mode: str | None) -> tuple[CudaGraphAudit, torch.Tensor, torch.Tensor]:
    """audited_compiled_sampling of the product's own code, once per mode for the tests that read it (a compile
    each: ~3 s); a test that patches the product calls audited_compiled_sampling itself."""
    return audited_compiled_sampling(mode)


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_compiled_unet_takes_a_runs_tensors_as_a_few_stacks(mode: str) -> None:
    """A CUDA-graph replay copies every tensor input that is not a parameter, one copy and launch each. The run's
    per-site keys and values reach the compiled U-Net stacked by shape (site_stacks.py), hybrid's fusion gates as
    one vector: the adapter adds a few inputs whatever the number of sites (the minimal U-Net: 7 sites with two
    head widths; before the stacks, 22 inputs in hybrid mode, 29 in paper mode; on an H100, SD1.5 copied 49
    per step)."""
    from llmdiff_core.site_stacks import SiteStack

    mp = tiny_sd15_minimal()
    sites = find_sites(mp.model.diffusion_model)[0]
    widths = {(s.heads, s.dim_head) for s in sites}
    assert (len(sites), len(widths)) == (7, 2)
    unpatched, _, _ = product_audit(None)
    patched, out, want = product_audit(mode)
    assert max_rel(out, want) < 1e-6
    # per head width: the keys and the values (paper mode: its original path's too); hybrid: the fusion vector;
    # both: the mask's additive bias
    added = len(widths) * (2 if mode == "clip" else 4) + (1 if mode == "clip" else 0) + 1
    assert unpatched.copied == [3], unpatched.copied  # x, the timesteps, the context
    assert patched.copied == [3 + added], patched.copied
    assert SiteStack.of([torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)]).where == ((0, 0), (1, 0), (0, 1))


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_compiled_unet_computes_no_more_per_site_than_the_method_needs(mode: str) -> None:
    """What the adapter adds to a compiled U-Net's step, op by op (views aside: each op left is a kernel, or
    several): hybrid, per site, tau_q's matmul, the masked attention and the fusion (one addcmul) and nothing
    else: no cast, copy or mask rebuilt per step (those belong to the once-per-run entry). Paper mode replaces
    the attention: its two attentions and their sum, and tau_q in place of to_k / to_v of the placeholder
    context, which the graph then drops as dead code. A regression that adds work per site and step fails here.
    (On an H100 the SD1.5 step under CUDA graphs is 12.0 ms, and 16 sites x one extra kernel of a few µs is
    ~0.5 % of it: docs/benchmarks.md §3p.)"""
    unpatched = product_audit(None)[0]
    patched = product_audit(mode)[0]
    n = len(find_sites(tiny_sd15_minimal().model.diffusion_model)[0])
    assert len(unpatched.computing) == len(patched.computing) == 1
    base, ops = unpatched.computing[0], patched.computing[0]
    (sdpa,) = [op for op in base if "scaled_dot_product" in op]
    if mode == "clip":
        assert (dict(ops - base), dict(base - ops)) == ({"aten.mm": n, sdpa: n, "aten.addcmul": n}, {})
    else:
        assert (dict(ops - base), dict(base - ops)) == ({sdpa: n, "aten.add": n}, {"aten.mm": n})


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_compiled_unet_runs_the_patches_in_one_graph(mode: str) -> None:
    """set_torch_compile_wrapper (what TorchCompileModel does) on a patched model: the once-per-run work
    stays outside the compiled U-Net, the patches trace into the U-Net's single graph (no graph break,
    one graph call per U-Net call), the result is the eager one, and neither a new prompt nor a re-applied
    adapter (another strength, other block weights) compiles again."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    def compiled(m: Any, backend: GraphCounter) -> Any:
        c = m.clone()
        set_torch_compile_wrapper(c, backend=backend)
        return c

    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, mode)
    neg = prompt("minimal", [3], 2)
    torch._dynamo.reset()
    counters.clear()
    try:
        backend = GraphCounter()
        m = apply_adapter(mp, adapter)
        pos = prompt("minimal", [6], 1)
        out = sample(compiled(m, backend), pos, neg, noise(1), steps=3)
        assert max_rel(out, sample(m, pos, neg, noise(1), steps=3)) < 1e-6
        assert backend.calls == [3], backend.calls  # one graph, called once per step (cond + uncond batched)
        assert not counters["graph_break"], dict(counters["graph_break"])

        for strength, blocks, seed in ((1.0, None, 7), (0.6, None, 8), (0.3, {0: 0.5, 1: 2.0}, 9)):
            m = apply_adapter(mp, adapter, strength=strength, block_weights=blocks)  # new prompts, re-applied
            pos = prompt("minimal", [6], seed)
            out = sample(compiled(m, backend), pos, neg, noise(1), steps=3)
            assert max_rel(out, sample(m, pos, neg, noise(1), steps=3)) < 1e-6
        # one graph for all: the gates reach it as tensors (hybrid's w_orig as ScaledSites.fusion_weights,
        # the rest folded into the values); as a Python float, w_orig recompiled hybrid at the first new strength
        assert len(backend.calls) == 1, backend.calls
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
