"""LLMDiff inside a real ComfyUI U-Net (llmdiff_core/comfy_patch.py and the modules it wires, attention.py):
the math against the literal Eq. 10 (patching_support.reference_output), training calls, sampling and the
per-run cache, strength and block weights, other attention patches and model checks.

The once-per-run preparation and the fusion at the attention core are in test_run_preparation.py, the
patched U-Net under torch.compile in test_patching_compiled.py.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch

import comfy.model_patcher
from comfy.patcher_extension import WrappersMP

from llmdiff_core.attention import RunMask, attend, effective_gates, fuse_after_out, fuse_at_core
from llmdiff_core.adapter_runtime import AdapterRuntime, TrainingCall
from llmdiff_core.comfy_patch import WRAPPER_KEY, apply_adapter
from llmdiff_core.conditioning import CONDLLMDiff, FeatureBatch, FeaturePart, attach_features
from llmdiff_core.errors import AdapterMismatchError, LLMDiffError
from llmdiff_core.features import LLMFeatures
from llmdiff_core.model_wrappers import FEATURES_KEY
from llmdiff_core.unet_sites import find_sites
from patching_support import (UNETS, make_features, clip_conditioning, prompt, adapter_for, noise, sample,
                              diffusion_output, runtime_of, count_calls, max_rel, literal_attention, reference_output,
                              direct_inputs, half_copy, DummyReplace, DummyOutputPatch, with_dummy)
from tiny_unets import tiny_sd15, tiny_sd15_minimal, tiny_sd15_minimal_stored_in, tiny_sdxl


# Which llmdiff_core module calls each function the tests count or replace (count_calls, monkeypatch): a count
# of 0 there proves nothing if another module calls it too. (fused_site.py: the op's fallback where the GPU cannot
# hold a tile; the tests that count fuse_at_core in site_patches see that one in fused_site._UNFIT)
COUNTED_CALLERS = {"attend": {"adapter_runtime.py"}, "fuse_at_core": {"site_patches.py", "fused_site.py"},
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


# --- pure math (attention.py) -------------------------------------------------------------------------

def test_attention_matches_literal_and_empty_rows_give_zero() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0] * 7], dtype=torch.bool)
    rm = RunMask.prepare(mask, torch.float32, torch.device("cpu"))
    # A row with no key attends to every key (then keep zeroes it): a fully -inf bias row is 0 from the CPU's
    # SDPA (safe softmax) but NaN from CUDA's flash / efficient kernels and the fused site kernel, and
    # NaN * keep stays NaN. So the bias itself is checked, not only the (CPU) output.
    assert torch.equal(rm.bias[2], torch.zeros_like(rm.bias[2]))
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
        # a training call's gates are tensors (their gradients flow): the fallback's other branch
        got = fuse_after_out(to_out(a_orig), w_new * a_new, to_out.weight, to_out.bias, torch.tensor(w_orig))
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


def test_a_site_whose_new_path_is_off_still_scales_its_original_path() -> None:
    """w_new = 0 with w_orig != 1 is not the identity: Eq. 10 still scales that site's A_orig."""
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    with torch.no_grad():
        adapter.a_new[::2] = 0.0
    w_orig, w_new = adapter.gate_weights()
    assert bool((w_new[::2] == 0).all()) and bool((w_orig[::2] != 1).all())
    features = make_features([5, 11], seed=3)
    x, sigma, context, y = direct_inputs("sd15")
    got = diffusion_output(apply_adapter(mp, adapter), x, sigma, context, y, CONDLLMDiff(features).concat([]))
    assert max_rel(got, reference_output(mp, adapter, features, x, sigma, context, y, paper=False)) < 1e-5

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


@pytest.mark.parametrize("mode", ["clip", "llm"])
def test_a_unet_stored_in_float8_samples_as_its_weights_do_in_float32(mode: str) -> None:
    """Load Diffusion Model's weight_dtype fp8_e4m3fn (low-VRAM SDXL setups): the U-Net stores float8 and its
    comfy.ops layers cast each weight per call. The patches read the original path's weights through the same
    casts (paper mode projects phi(c) with them), so the patched model samples what the float32 U-Net holding
    the same rounded weights samples, and a fresh hybrid adapter changes nothing."""
    stored, reference = tiny_sd15_minimal_stored_in(torch.float8_e4m3fn)
    assert stored.model.diffusion_model.dtype == torch.float8_e4m3fn
    n = noise(2)
    positive, negative = prompt("minimal", [5, 9], 3), prompt("minimal", [1, 1], 4)
    if mode == "clip":  # (prompt's CLIP part is clip_conditioning of the same seed)
        unpatched = sample(stored, clip_conditioning("minimal", 2, 3), clip_conditioning("minimal", 2, 4), n)
        fresh = sample(apply_adapter(stored, adapter_for(stored, mode, trained=False)), positive, negative, n)
        assert torch.equal(fresh, unpatched)
    adapter = adapter_for(reference, mode)
    want = sample(apply_adapter(reference, adapter), positive, negative, n)
    got = sample(apply_adapter(stored, adapter), positive, negative, n)
    assert max_rel(got, want) < 1e-6
    if mode == "clip":
        assert max_rel(got, unpatched) > 0.1  # the trained adapter acts: the equality above is not vacuous


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
    for block_weights in ([1.0] * n, [0.5] * n, [0.5 + 0.1 * i for i in range(n)]):  # (one scalar; a vector)
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
