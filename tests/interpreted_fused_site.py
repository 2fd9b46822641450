"""fused_site.py's Triton kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1).

Not collected by the suite itself (the name is not test_*): tests/test_fused_site.py runs this file in a
pytest of its own, with Triton on the path and the interpreter on, so that Triton never enters the main test
process. The GPU runs the same kernel compiled (bench/gpu_checks.py, check 12).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pytest
import torch

from llmdiff_core import fused_site
from llmdiff_core.adapter_runtime import AdapterRuntime, TrainingCall
from llmdiff_core.comfy_patch import apply_adapter
from llmdiff_core.conditioning import CONDLLMDiff, attach_features
from patching_support import (DummyReplace, GraphCounter, adapter_for, clip_conditioning, compile_kwargs, count_calls,
                           diffusion_output, direct_inputs, half_copy, make_features, max_rel, noise, reference_output,
                           runtime_of, sample, with_dummy)
from tiny_unets import tiny_sd15, tiny_sd15_minimal, tiny_sdxl

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run through tests/test_fused_site.py: it sets TRITON_INTERPRET=1 before Triton is imported")


def interpreter_runs_loops() -> str:
    """"" if this Triton's CPU interpreter runs a loop to a runtime bound (the kernel's tau_q loop over the
    channels), else why not (with the Triton and NumPy releases). Triton 3.4 and 3.6 (torch 2.8's and 2.11's) under NumPy 2.4 hand the loop a
    1-element array where range() wants an int; the pinned runtime's Triton 3.9 runs it. Compiled for a GPU
    the loop is fine: this is the interpreter only."""
    import triton
    import triton.language as tl

    @triton.jit
    def total(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    x, out = torch.arange(40, dtype=torch.float32), torch.zeros(16)
    try:
        total[(1,)](x, out, 40, BLOCK=16)
        failed = "" if out.sum().item() == x.sum().item() else f"summed {out.sum().item()}, not {x.sum().item()}"
    except Exception as e:  # (triton.runtime.errors.InterpreterError, whose module moved between releases)
        failed = f"{type(e).__name__}: {e}"
    import numpy
    return failed and (f"Triton {triton.__version__}'s CPU interpreter (NumPy {numpy.__version__}) cannot run the "
                       f"kernel's loops ({failed}); the pinned runtime's Triton can")


if (why := interpreter_runs_loops()) and not os.environ.get("CI"):
    pytest.skip(why, allow_module_level=True)

UNETS = {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "minimal": tiny_sd15_minimal}


def site_inputs(rows: int, heads: int, head_dim: int, tokens: int, dtype: torch.dtype, masked: bool,
                empty_row: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b, channels = 2, heads * head_dim
    n = torch.randn(b, rows, channels, generator=g)
    w_q = torch.randn(channels, channels, generator=g) / math.sqrt(channels)
    # keys and values as the entry holds them: slot 1 of a [sites, B, H, T, d] stack
    keys = torch.randn(3, b, heads, tokens, head_dim, generator=g)[1]
    values = torch.randn(3, b, heads, tokens, head_dim, generator=g)[1]
    attend = torch.rand(b, tokens, generator=g) > (0.4 if masked else -1.0)
    attend[:, 0] = True
    bias = keep = None
    if masked:
        bias = torch.zeros(b, tokens).masked_fill(~attend, float("-inf"))[:, None, None, :]
    if empty_row:  # RunMask: a row with nothing to attend to attends to all (finite) and is zeroed
        keep = torch.tensor([1.0, 0.0])[:, None, None]
    a_orig = torch.randn(b, rows, channels, generator=g)
    cast = [t if t is None else t.to(dtype) for t in (n, w_q, keys, values, bias, keep, a_orig)]
    return (*cast, torch.tensor(0.7))


@pytest.mark.parametrize("rows, heads, head_dim, tokens", [
    (150, 2, 40, 32),   # SD1.5's first level: 40 channels a head (padded to 64), rows past a block (of 128)
    (64, 2, 80, 96),    # SD1.5's second level: 80 (padded to 128)
    (20, 1, 160, 40),   # SD1.5's deepest sites: 160 (padded to 256), a span that is no power of two
    (70, 3, 64, 256),   # SDXL's heads, the longest span the kernel takes (32 rows a program)
    (40, 1, 160, 200),  # the deepest sites at a long span: 16 rows a program (launch_config)
])
@pytest.mark.parametrize("masked, empty_row", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("project", [True, False], ids=["fused", "fused-attention"])
def test_kernel_is_the_literal_math(rows: int, heads: int, head_dim: int, tokens: int, masked: bool,
                                    empty_row: bool, project: bool) -> None:
    """project=False: the kernel is given tau_q(n) (site kernel fused-attention) and attends and fuses only."""
    inputs = site_inputs(rows, heads, head_dim, tokens, torch.float32, masked, empty_row)
    if not project:
        inputs = (inputs[0] @ inputs[1].T, None, *inputs[2:])
    assert fused_site.applies(torch.device("cpu"), torch.float32, heads, head_dim, tokens)
    got = fused_site.hybrid_site(*inputs)
    want = fused_site.reference(*inputs)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert max_rel(got, want) < 2e-6
    if empty_row:  # the zeroed row is A_orig scaled, exactly
        assert torch.allclose(got[1].double(), 0.7 * inputs[6][1].double(), atol=1e-6)


def test_kernel_in_half_precision_rounds_like_the_three_kernels() -> None:
    inputs = site_inputs(100, 2, 40, 64, torch.float16, masked=True, empty_row=False)
    got = fused_site.hybrid_site(*inputs)
    assert got.dtype == torch.float16
    assert max_rel(got, fused_site.reference(*inputs)) < 2e-3


def test_kernel_takes_what_it_can_and_says_so() -> None:
    cpu = torch.device("cpu")
    assert fused_site.applies(cpu, torch.float16, 8, 40, 128)
    assert not fused_site.applies(cpu, torch.bfloat16, 8, 40, 128)  # the interpreter's dot reads raw bits
    assert not fused_site.applies(cpu, torch.float32, 8, 40, fused_site.MAX_KEYS + 1)
    assert not fused_site.applies(cpu, torch.float32, 1, fused_site.MAX_HEAD_DIM + 1, 32)


@pytest.mark.parametrize("project", [True, False], ids=["fused", "fused-attention"])
def test_tiles_the_gpu_cannot_hold_run_the_three_kernel_math_and_say_so_once(monkeypatch: pytest.MonkeyPatch,
                                                                           project: bool) -> None:
    """Triton finds at a kernel's first launch that its tiles need more shared memory than the GPU has (a
    160-channel head over 256 keys: 136 KB; an RTX 4090 has 99 KB a block): that op variant then computes its
    sites with torch's kernels, from that call on, and the log says so once."""
    from triton.runtime.errors import OutOfResources

    launches = []

    def too_big(*args: Any) -> None:
        launches.append(args[0])
        raise OutOfResources(136 * 1024, 99 * 1024, "shared memory")
    monkeypatch.setattr(fused_site, "_launch", too_big)
    monkeypatch.setattr(fused_site, "_UNFIT", set())
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("llmdiff").addHandler(handler)
    try:
        inputs = site_inputs(40, 1, 160, 200, torch.float32, masked=True, empty_row=True)
        if not project:
            inputs = (inputs[0] @ inputs[1].T, None, *inputs[2:])
        first, second = fused_site.hybrid_site(*inputs), fused_site.hybrid_site(*inputs)
    finally:
        logging.getLogger("llmdiff").removeHandler(handler)
    assert len(launches) == 1  # the variant is remembered: the second call does not try the kernel
    assert max_rel(first, fused_site.reference(*inputs)) < 2e-6 and torch.equal(first, second)
    assert torch.allclose(first[1].double(), 0.7 * inputs[6][1].double(), atol=1e-6)  # keep: the empty row
    assert len(messages) == 1 and "does not fit this GPU at heads of 160 over 200 keys" in messages[0]


def fused(mp: Any, adapter: Any, kernel: str = "fused", **kwargs: Any) -> Any:
    return apply_adapter(mp, adapter, site_kernel=kernel, **kwargs)


def counted_op(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the fused kernel's calls: the entry looks its op up once per run through fused_site.op."""
    counts = {"kernel": 0}
    real = fused_site.op()

    def op(*args: Any) -> torch.Tensor:
        counts["kernel"] += 1
        return real(*args)
    monkeypatch.setattr(fused_site, "op", lambda: op)
    return counts


@pytest.mark.parametrize("family, kernel", [("sd15", "fused"), ("sdxl", "fused"), ("sd15", "fused-attention")])
def test_every_site_runs_in_the_kernel_and_the_unet_is_eq10(family: str, kernel: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import llmdiff_core.site_patches as patches
    mp = UNETS[family]()
    adapter = adapter_for(mp, "clip")
    features = make_features([5, 11], seed=3)
    x, sigma, context, y = direct_inputs(family)
    counts = counted_op(monkeypatch)
    count_calls(patches, "fuse_at_core", counts, monkeypatch)
    count_calls(AdapterRuntime, "new_path", counts, monkeypatch)
    monkeypatch.setattr(fused_site, "_UNFIT", set())
    got = diffusion_output(fused(mp, adapter, kernel), x, sigma, context, y, CONDLLMDiff(features).concat([]))
    assert max_rel(got, reference_output(mp, adapter, features, x, sigma, context, y, paper=False)) < 1e-5
    assert counts == {"kernel": len(adapter.sites), "fuse_at_core": 0, "new_path": 0}
    assert not fused_site._UNFIT  # (the op's own fallback, which the counts above cannot see, never ran)


def test_auto_runs_the_kernel_in_a_run_under_inductors_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default site kernel (auto) runs fused-attention at every site of a run whose compile wrapper asks for
    CUDA graphs (its arguments alone here: nothing compiles), the very images of site_kernel="fused-attention",
    and the three kernels in a run without them."""
    monkeypatch.delenv(fused_site.SITE_KERNEL_ENV, raising=False)
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    m = apply_adapter(mp, adapter)
    graphs = m.clone()
    graphs.model_options["torch_compile_kwargs"] = compile_kwargs(mode="reduce-overhead")
    pos = attach_features(clip_conditioning("minimal", 1, 1), make_features([9], 1))
    neg = attach_features(clip_conditioning("minimal", 1, 2), make_features([2], 2))
    counts = counted_op(monkeypatch)
    three = sample(m, pos, neg, noise(1), steps=2)
    assert counts["kernel"] == 0
    auto = sample(graphs, pos, neg, noise(1), steps=2)
    assert counts["kernel"] == 2 * len(adapter.sites)  # (two steps, one U-Net call each)
    assert torch.equal(auto, sample(fused(mp, adapter, "fused-attention"), pos, neg, noise(1), steps=2))
    assert max_rel(auto, three) < 1e-5 and not torch.equal(auto, three)


def test_half_precision_sampling_is_as_exact_as_the_three_kernel_path() -> None:
    """float16 sampling, against the float32 run: the one kernel's error is about the three kernels'. (It rounds
    the attention's probabilities to float16 before multiplying the values, as flash attention does on a GPU;
    the CPU's SDPA, the three kernels here, keeps them in float32.)"""
    mp32 = tiny_sd15()
    mp = half_copy(mp32, torch.float16)
    adapter = adapter_for(mp32, "clip")
    pos = attach_features(clip_conditioning("sd15", 1, 1), make_features([9], 1))
    neg = attach_features(clip_conditioning("sd15", 1, 2), make_features([2], 2))
    exact = sample(apply_adapter(mp32, adapter), pos, neg, noise(1), steps=3)
    three = max_rel(sample(apply_adapter(mp, adapter, site_kernel="torch"), pos, neg, noise(1), steps=3), exact)
    one = max_rel(sample(fused(mp, adapter), pos, neg, noise(1), steps=3), exact)
    print(f"float16 against float32: three kernels {three:.2e}, one kernel {one:.2e}")
    assert one < 1.5 * three and three < 2e-2
    assert max_rel(exact, sample(mp32, pos, neg, noise(1), steps=3)) > 1e-2  # (the adapter acts)


def test_a_site_the_core_does_not_fuse_computes_its_new_path_where_it_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sites taken by a replace patch (IP-Adapter) are not deferred; a deferred site whose core call the override
    cannot fuse (here: every one) is computed from its input at the output patch, with the same result."""
    import llmdiff_core.site_patches as patches
    mp = tiny_sd15_minimal()
    adapter = adapter_for(mp, "clip")
    features = make_features([5, 11], seed=3)
    x, sigma, context, y = direct_inputs("minimal")
    want = reference_output(mp, adapter, features, x, sigma, context, y, paper=False)
    counts = counted_op(monkeypatch)
    dummy = DummyReplace(0.0)
    got = diffusion_output(fused(with_dummy(mp, dummy), adapter), x, sigma, context, y,
                           CONDLLMDiff(features).concat([]))
    assert dummy.calls == len(adapter.sites) and counts["kernel"] == 0
    assert max_rel(got, want) < 1e-5

    def core_that_never_fuses(self: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)
    monkeypatch.setattr(patches.CoreFusion, "__call__", core_that_never_fuses)
    count_calls(patches, "fuse_after_out", counts, monkeypatch)
    got = diffusion_output(fused(mp, adapter), x, sigma, context, y, CONDLLMDiff(features).concat([]))
    assert counts["kernel"] == 0 and counts["fuse_after_out"] == len(adapter.sites)
    assert max_rel(got, want) < 1e-5


def test_training_calls_and_paper_mode_keep_the_three_kernel_path() -> None:
    """The kernel has no backward (a training call's sites keep autograd's path), and paper mode has no fusion."""
    mp = tiny_sd15_minimal()
    batch = CONDLLMDiff(make_features([5, 11], seed=3)).concat([])
    cpu = torch.device("cpu")
    hybrid = runtime_of(fused(mp, adapter_for(mp, "clip")))
    assert hybrid.entry_for(batch, cpu, torch.float32).fused == (True,) * len(hybrid.sites)
    assert hybrid.entry_for(batch, cpu, torch.float32, TrainingCall()).fused == ()
    paper = runtime_of(fused(mp, adapter_for(mp, "llm")))
    assert paper.entry_for(batch, cpu, torch.float32).fused == ()


@pytest.mark.parametrize("backend", ["dynamo", "aot_eager"])
def test_compiled_unet_traces_the_kernel_into_one_graph(backend: str) -> None:
    """TorchCompileModel over the fused sites: the kernel is one op of the U-Net's single graph (no break), for
    prompts of two span lengths, and every image is the eager one."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    mp = tiny_sd15_minimal()
    m = fused(mp, adapter_for(mp, "clip"))
    c = m.clone()
    set_torch_compile_wrapper(c, backend=GraphCounter() if backend == "dynamo" else backend)
    neg = attach_features(clip_conditioning("minimal", 1, 2), make_features([3], 2, tokens=80))
    torch._dynamo.reset()
    counters.clear()
    try:
        for seed, length in enumerate([6, 40]):
            pos = attach_features(clip_conditioning("minimal", 1, seed), make_features([length], seed, tokens=80))
            out = sample(c, pos, neg, noise(1), steps=2)
            assert max_rel(out, sample(m, pos, neg, noise(1), steps=2)) < 1e-5
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
