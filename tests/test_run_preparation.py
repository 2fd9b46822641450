"""The once-per-run preparation (the attended span, the encoding cut to it, per-run tensors in the U-Net's
dtype) and the hybrid fusion at the attention core (issue 5), against the uncut and unfused math."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from llmdiff_core.attention import RunMask, attend, attended_span
from llmdiff_core.adapter_runtime import AdapterRuntime, TrainingCall
from llmdiff_core.comfy_patch import WRAPPER_KEY, apply_adapter
from llmdiff_core.conditioning import CONDLLMDiff
from llmdiff_core.features import LLMFeatures
from llmdiff_core.model_wrappers import OVERRIDE_KEY
from patching_support import (SPEC, UNETS, make_features, adapter_for, diffusion_output, runtime_of, count_calls,
                              max_rel, literal_attention, reference_output, direct_inputs, half_copy, DummyReplace,
                              with_dummy)
from tiny_unets import tiny_sd15_minimal


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
