"""The one-kernel hybrid site (llmdiff_core/fused_site.py).

Its Triton kernel is checked in pytests of their own: run by Triton's CPU interpreter
(tests/interpreted_fused_site.py), and compiled for Hopper and Ampere (tests/compiled_fused_site.py). Triton is
not part of the CPU test environment, so scripts/setup_env.sh installs it into <env>/compat/triton beside the
pinned ComfyUI, and only those subprocesses put it on their path (a torch that sees Triton changes what
torch.compile does, which the rest of the suite must not). The other tests here need no Triton: the setting,
the kernel each sampling run takes, and that a request for the kernel where it cannot run changes nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys

import pytest
import torch

from compat_folders import compat_folder, env_importing_first, pytest_under
from llmdiff_core import fused_site
from llmdiff_core.comfy_patch import apply_adapter
from llmdiff_core.conditioning import CONDLLMDiff, attach_features
from patching_support import (adapter_for, clip_conditioning, compile_kwargs, diffusion_output, direct_inputs,
                              make_features, noise, runtime_of, sample)
from tiny_unets import tiny_sd15_minimal

INTERPRETED_TESTS = 43  # tests/interpreted_fused_site.py's count, parametrized cases included
COMPILED_TESTS = 25  # tests/compiled_fused_site.py's


def triton_path() -> str:
    """What the interpreter subprocess adds to PYTHONPATH: nothing where this Python has Triton (a CUDA torch),
    else the pinned runtime's copy."""
    if importlib.util.find_spec("triton") is not None:
        return ""
    return str(compat_folder("triton", "scripts/setup_env.sh installs Triton there with the pinned runtime",
                             "needs Triton: the pinned runtime of scripts/setup_env.sh, or a torch that ships it"))


def run_with_triton(test_file: str, count: int, interpret: bool) -> None:
    """pytest on test_file in a subprocess with Triton on its path: every one of its `count` tests passes."""
    env = env_importing_first(triton_path())
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = pytest_under(env, ["-p", "no:logging", "-rs", test_file], 1200)  # (-rs: a skip's reason in the summary)
    if " passed" not in proc.stdout and " skipped" in proc.stdout and not os.environ.get("CI"):  # (pytest's exit 5)
        why = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")] or [proc.stdout[-300:]]
        pytest.skip(f"{test_file} skipped itself here (this Triton is not the pinned one): {why[0]}")
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert re.search(rf"\b{count} passed\b", proc.stdout) and "skipped" not in proc.stdout, proc.stdout[-500:]


@pytest.mark.slow
def test_the_kernel_under_tritons_interpreter() -> None:
    """Its math against a literal float64 reference at SD1.5's and SDXL's head widths and spans, the patched
    U-Net with every site in the kernel (Eq. 10), the fallbacks, and one compiled graph: ~2 min."""
    run_with_triton("tests/interpreted_fused_site.py", INTERPRETED_TESTS, interpret=True)


@pytest.mark.slow
def test_the_kernel_compiles_for_hopper_and_ampere() -> None:
    """Compiled by Triton for sm_90 and sm_80 (fp16, bf16; with and without tau_q) at every site shape, the
    product's tiles and the GPU benchmark's, each within the GPU's shared memory: ~1 min."""
    run_with_triton("tests/compiled_fused_site.py", COMPILED_TESTS, interpret=False)


def test_the_setting_comes_from_the_call_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fused_site.SITE_KERNEL_ENV, raising=False)
    assert fused_site.site_kernel_setting() == "auto"
    monkeypatch.setenv(fused_site.SITE_KERNEL_ENV, "fused")
    assert fused_site.site_kernel_setting() == "fused"
    assert fused_site.site_kernel_setting("torch") == "torch"
    monkeypatch.setenv(fused_site.SITE_KERNEL_ENV, "triton")
    with pytest.raises(ValueError, match=r"'triton' \(from LLMDIFF_SITE_KERNEL\) is not one of auto, torch, fused, "
                                         "fused-attention"):
        fused_site.site_kernel_setting()
    with pytest.raises(ValueError, match="from the call"):
        apply_adapter(tiny_sd15_minimal(), adapter_for(tiny_sd15_minimal()), site_kernel="Fused")


@pytest.mark.parametrize("kwargs, want", [
    (None, "torch"),
    (compile_kwargs(), "torch"),  # plain inductor: no whole step measured with the kernel
    (compile_kwargs(mode="default"), "torch"),
    (compile_kwargs(mode="max-autotune-no-cudagraphs"), "torch"),
    (compile_kwargs(mode="reduce-overhead"), "fused-attention"),
    (compile_kwargs(mode="max-autotune"), "fused-attention"),
    (compile_kwargs(options={"triton.cudagraphs": True}), "fused-attention"),
    (compile_kwargs(options={"triton.cudagraphs": False, "max_autotune": True}), "torch"),
    (compile_kwargs(backend="cudagraphs"), "torch"),  # (its whole step is unmeasured with the kernel)
    (compile_kwargs(backend="eager", mode="reduce-overhead"), "torch"),
])
def test_auto_picks_fused_attention_where_inductor_replays_cuda_graphs(kwargs: dict | None, want: str) -> None:
    assert fused_site.kernel_for_run("auto", kwargs) == want
    for named in ("torch", "fused", "fused-attention"):  # a named kernel is every run's
        assert fused_site.kernel_for_run(named, kwargs) == named


def test_a_run_takes_the_kernel_its_compile_asks_for_and_builds_its_own_entry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (auto) follows the compile wrapper's arguments of each sampling run's model, wherever
    TorchCompileModel sits in the graph; a kept entry of a run with the other kernel is not taken, one of the same
    kernel is; outside a run the three kernels run. (On this CPU the kernel never applies: tests/
    interpreted_fused_site.py runs it under auto.)"""
    monkeypatch.delenv(fused_site.SITE_KERNEL_ENV, raising=False)
    mp = tiny_sd15_minimal()
    m = apply_adapter(mp, adapter_for(mp))
    runtime = runtime_of(m)
    graphs = m.clone()  # (the kwargs alone: the run's kernel follows them, nothing is compiled here)
    graphs.model_options["torch_compile_kwargs"] = compile_kwargs(mode="reduce-overhead")
    plain = m.clone()
    plain.model_options["torch_compile_kwargs"] = compile_kwargs()
    pos = attach_features(clip_conditioning("minimal", 1, 1), make_features([9], 1))
    neg = attach_features(clip_conditioning("minimal", 1, 2), make_features([2], 2))
    seen = []
    for model, want, reused in ((graphs, "fused-attention", 0), (graphs, "fused-attention", 1), (plain, "torch", 0),
                                (m, "torch", 1), (graphs, "fused-attention", 0)):
        sample(model, pos, neg, noise(1), steps=2)  # (one entry a run: the sampler batches both prompts)
        seen.append(([e.site_kernel for e in runtime.runs.kept], runtime.runs.reused))
        assert seen[-1] == ([want], reused), seen
        assert runtime.run_site_kernel == "torch"  # (between runs)
    monkeypatch.setenv(fused_site.SITE_KERNEL_ENV, "torch")
    named = runtime_of(apply_adapter(mp, adapter_for(mp)))
    named.begin_run(m.get_model_object("model_sampling"), compile_kwargs(mode="reduce-overhead"))
    assert named.run_site_kernel == "torch"


class TritonLookups(importlib.abc.MetaPathFinder):
    """Records every lookup of a triton module that reaches the import system (an import or a find_spec) and
    finds nothing itself. Where Triton is not imported yet (always in the pinned runtime, which lacks it), every
such lookup reaches it."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] == "triton":
            self.names.append(name)
        return None

    def __enter__(self) -> TritonLookups:
        sys.meta_path.insert(0, self)  # (the interpreter's own list: a finder added meanwhile stays)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.meta_path.remove(self)


def test_a_request_where_the_kernel_cannot_run_is_the_three_kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without Triton's interpreter (or without Triton) the kernel does not apply: every site keeps the
    three kernels, bit for bit, and nothing so much as looks for Triton."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused_site._triton_ready.cache_clear()  # (a cached answer would hide a lookup)
    with TritonLookups() as lookups:
        mp = tiny_sd15_minimal()
        adapter = adapter_for(mp)
        features = make_features([5, 11], seed=3)
        x, sigma, context, y = direct_inputs("minimal")
        m = apply_adapter(mp, adapter, site_kernel="fused")
        got = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(features).concat([]))
        want = diffusion_output(apply_adapter(mp, adapter, site_kernel="torch"), x, sigma, context, y,
                                CONDLLMDiff(features).concat([]))
        assert torch.equal(got, want)
        entry = runtime_of(m).entry_for(CONDLLMDiff(features).concat([]), torch.device("cpu"), torch.float32)
        assert entry.fused == (False,) * len(adapter.sites) and entry.site_op is None
        assert not fused_site.applies(torch.device("cpu"), torch.float32, 8, 40, 64)
    assert lookups.names == []


@pytest.mark.parametrize("capability, hip, runs", [
    ((7, 5), None, False),  # Turing: every tile spilled kilobytes a thread (docs/benchmarks.md §3w)
    ((8, 0), None, True),
    ((8, 9), None, True),
    ((9, 0), None, True),
    ((9, 4), "6.2", False),  # ROCm reports its GPUs as CUDA: the kernel was never run there
])
def test_on_cuda_the_kernel_runs_on_nvidia_gpus_from_ampere_on(monkeypatch: pytest.MonkeyPatch,
                                                                capability: tuple[int, int], hip: str | None,
                                                                runs: bool) -> None:
    """The capability is read once per GPU (cached), for the GPU the run's U-Net is on."""
    asked: list[int] = []

    def capability_of(index: int) -> tuple[int, int]:
        asked.append(index)
        return capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(fused_site, "_triton_ready", lambda: True)
    fused_site._kernel_gpu.cache_clear()
    try:
        cuda1 = torch.device("cuda", 1)
        assert fused_site.applies(cuda1, torch.float16, 8, 40, 128) is runs
        assert fused_site.applies(cuda1, torch.bfloat16, 10, 64, 256) is runs
        assert not fused_site.applies(cuda1, torch.float32, 8, 40, 128)  # (TF32: less exact than the three kernels)
        assert not fused_site.applies(cuda1, torch.float16, 8, 40, fused_site.MAX_KEYS + 1)
        assert asked == ([] if hip else [1])
    finally:
        fused_site._kernel_gpu.cache_clear()
