"""The patched U-Net under torch.compile (ComfyUI's TorchCompileModel wrapper and the training compile):
graphs per prompt length and strength, no breaks, the eager results, and what keeps it capturable as CUDA
graphs (tests/cuda_graph_audit.py)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from llmdiff_core.attention import attend
from llmdiff_core.adapter_runtime import AdapterRuntime, TrainingCall
from llmdiff_core.comfy_patch import apply_adapter, forget_kept_entries
from llmdiff_core.conditioning import CONDLLMDiff, attach_features
from llmdiff_core.features import LLMFeatures
from llmdiff_core.unet_sites import find_sites
from cuda_graph_audit import CudaGraphAudit, emulate_cudagraphs_backend
from patching_support import (SPEC, make_features, clip_conditioning, prompt, adapter_for, noise, sample,
                              diffusion_output, max_rel, direct_inputs, GraphCounter)
from tiny_unets import tiny_sd15_minimal


@pytest.mark.slow
def test_inductor_trains_batches_of_any_caption_length_as_eager() -> None:
    """--compile-unet inductor as the trainer runs it (over the whole token bucket: --compile-whole-bucket, the
    default), over batches whose captions span 96, 64 and 32 keys: inductor's generated code checks its
    inputs' sizes and strides, which dynamo with aot_eager (the other tests here) does not run. One static graph
    gives the eager outputs and the eager gradients of every adapter weight.

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


@pytest.mark.parametrize("whole_bucket", [False, True], ids=["span", "whole bucket"])
def test_compiled_training_calls_trace_at_most_twice_over_the_span_buckets(whole_bucket: bool) -> None:
    """Training batches attend to spans of 32, 64, 96 or 127 keys (SPAN_BUCKET in a 128-token bucket) and their
    c is encoded only that far: the compiled U-Net (ComfyUI's torch.compile wrapper, what --compile-unet sets;
    aot_eager traces forward and backward) traces a static graph, then one with the key length dynamic, and no
    more: no recompilation per batch and no graph break, whatever the captions' lengths. Over the whole
    bucket (TrainingCall.whole_bucket, what the trainer asks for when it compiles) it traces one graph.
    (Training does not mark the key length dynamic up front, as sampling does: RunMask.mark_key_length.)"""
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
    The per-run K/V, values and mask carry that length as a dynamic dim (RunMask.mark_key_length), so the compiled
    U-Net (TorchCompileModel) traces once for all of them: no second, dynamic compile of the whole U-Net when a
    longer prompt comes (minutes for SDXL), and every image is the eager one. With inductor too, whose
    generated code checks its inputs' sizes and strides (in training it failed on them: RunMask.mark_key_length)."""
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


def test_the_cudagraphs_backend_samples_prompts_of_every_span_as_eager(monkeypatch: Any) -> None:
    """TorchCompileModel with backend cudagraphs: torch keeps one recording per compiled graph and per value of
    its integer inputs, and a dynamic key length is not one of them, so with the length dynamic a prompt of
    another span replayed the first one's recording (on an H200: "The size of tensor a (32) must match the size
    of tensor b (96)", docs/benchmarks.md §5j). Under that backend the run marks the length static: a graph, and
    a recording, per span length, and every image is the eager one. (torch's backend code runs here, the
    recording itself is emulated on the CPU: cuda_graph_audit.emulate_cudagraphs_backend.)"""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    replays = emulate_cudagraphs_backend(monkeypatch)
    mp = tiny_sd15_minimal()
    m = apply_adapter(mp, adapter_for(mp, "clip"))
    c = m.clone()
    set_torch_compile_wrapper(c, backend="cudagraphs")
    neg = attach_features(clip_conditioning("minimal", 1, 2), make_features([3], 2, tokens=80))
    torch._dynamo.reset()
    counters.clear()
    try:
        for seed, length in enumerate([6, 40, 20, 45]):  # spans of 32, 64, 32, 64 keys
            pos = attach_features(clip_conditioning("minimal", 1, seed), make_features([length], seed, tokens=80))
            want = sample(m, pos, neg, noise(1), steps=2)  # its entry is kept for a next run of these prompts,
            out = sample(c, pos, neg, noise(1), steps=2)  # but marked dynamic: the compiled run builds its own
            forget_kept_entries(m)
            assert max_rel(out, want) < 1e-6, length
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one per span length
        assert replays["recordings"] == 2 and replays["replays"] == 6, replays  # (2 U-Net calls a run)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


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
