"""The patched U-Net never reads a device value on the host inside a sampling step or a training step.

On a GPU every such read (.item(), bool(t), float(t), .tolist(), torch.equal, nonzero, boolean indexing, a
device->host copy) makes the host wait for the device: in every step it would drain the queue of launches
and, under CUDA graphs, leave the device idle while the host prepares the next replay. GPU check 2
(bench/gpu_checks.py) counts syncs with CUDA's own sync debug mode, but only where a GPU is lent. Here the U-Net,
the adapter and every per-call tensor live on the `meta` device, which has shapes and no values: any read of
one raises. What the host decides must come from host data: the prompts' features as Text Encode leaves them
(CPU) for sampling, the batch's key mask on the CPU (TrainingCall.host_mask) for training.

The other way round stalls the host too: torch copies a pageable host tensor to CUDA and then synchronises the
stream (at::cuda::memcpy_and_sync), so a host tensor moved to the device inside a step waits for every launch
queued before it. Here such a move is a CPU -> meta copy, which torch_dispatch sees (HostCopies).

Not covered: the Langevin noise of training (torch.Generator has no meta device; it draws on the device from
per-row seeds, without reads) and compiled U-Nets (dynamo makes a read a graph break, which the compile tests'
one-graph assertions catch).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import comfy.model_patcher

from llmdiff_core.adapter import LLMDiffAdapter
from llmdiff_core.adapter_runtime import AdapterRuntime, TrainingCall
from llmdiff_core.comfy_patch import applied_runtimes, apply_adapter
from llmdiff_core.conditioning import CONDLLMDiff
from llmdiff_core.features import LLMFeatures
from patching_support import UNETS, adapter_for, diffusion_output, direct_inputs, make_features

META = torch.device("meta")
READ_ERRORS = (RuntimeError, NotImplementedError)  # "... cannot be called on meta tensors", "Cannot copy out of meta"


def on_meta(family: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A tiny U-Net with a trained adapter applied, both on the meta device.

    A sampling run's entry reads the adapter's gates once (w.tolist(): floats, so a step needs no autograd and
    sees gates (1, 0) to be the identity); that one read per run is given its values from the CPU adapter."""
    mp = UNETS[family][0]()
    adapter = adapter_for(mp, mode)
    gates = adapter.gate_weights()
    adapter.to(META)
    # (a training call, under autograd, computes them from the meta parameters: tensors, never read)
    monkeypatch.setattr(adapter, "gate_weights", lambda: LLMDiffAdapter.gate_weights(adapter)
                        if torch.is_grad_enabled() else gates)
    meta_mp = comfy.model_patcher.ModelPatcher(copy.deepcopy(mp.model).to(META), load_device=META,
                                               offload_device=META)
    return apply_adapter(meta_mp, adapter)


def meta_inputs(family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return tuple(None if t is None else t.to(META) for t in direct_inputs(family))  # type: ignore[return-value]


class HostCopies(TorchDispatchMode):
    """Records every op that turns host data into a device (meta) tensor: (op, shapes of its host inputs). A host
    tensor's move dispatches (_to_copy, copy_); torch.tensor / as_tensor from Python data on a device do not, so
    those two are watched while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, list[tuple[int, ...]]]] = []
        self._factories = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        host = [tuple(t.shape) for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if host and any(isinstance(t, torch.Tensor) and t.device == META for t in tree_flatten(out)[0]):
            self.seen.append((str(func), host))
        return out

    def __enter__(self) -> HostCopies:
        def watched(name: str) -> Any:
            def factory(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
                out = self._factories[name](data, *args, **kwargs)
                if out.device == META and not (isinstance(data, torch.Tensor) and data.device == META):
                    self.seen.append((f"torch.{name}", [tuple(out.shape)]))
                return out
            return factory
        for name in self._factories:
            setattr(torch, name, watched(name))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._factories.items():
            setattr(torch, name, original)
        super().__exit__(*exc)


def runtime(m: Any) -> AdapterRuntime:
    return applied_runtimes(m)[-1]


def sampling_steps(m: Any, family: str, steps: int, model_sampling: Any = None,
                   watches: Sequence[HostCopies] = ()) -> list[torch.Tensor]:
    """One sampling run's U-Net calls as the sampler makes them (comfy/samplers.py: the features stay on the CPU
    in the conditioning; x, sigma and the CLIP context on the device, and transformer_options["sigmas"] is the
    call's sigma), between the runtime's run bracket (the OUTER_SAMPLE wrapper's begin_run / end_run).
    watches[i], where given, watches call i."""
    x, sigma, context, y = meta_inputs(family)
    batch = CONDLLMDiff(make_features([5, 11], seed=3)).concat([])
    m.model_options.setdefault("transformer_options", {})["sigmas"] = sigma
    rt = runtime(m)
    rt.begin_run(model_sampling or m.get_model_object("model_sampling"))
    outs = []
    try:
        for i in range(steps):
            with watches[i] if i < len(watches) else contextlib.nullcontext():
                outs.append(diffusion_output(m, x, sigma, context, y, batch))
        return outs
    finally:
        rt.end_run()


@pytest.mark.parametrize("family, mode", [("sd15", "clip"), ("sd15", "llm"), ("sdxl", "clip"), ("sdxl", "llm")])
def test_sampling_steps_read_no_device_value(family: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No U-Net call of a run reads: the first builds the run's entry (its span decided on the prompts' CPU mask;
    the gates read once, see on_meta), the later ones take it."""
    m = on_meta(family, mode, monkeypatch)
    outs = sampling_steps(m, family, steps=3)
    assert all(o.device == META and o.shape == (2, 4, 8, 8) for o in outs)
    assert runtime(m).runs.built == 1  # the later steps ran the per-step path, not a new entry


@pytest.mark.parametrize("family, mode", [("sd15", "clip"), ("sdxl", "llm")])
def test_sampling_steps_copy_nothing_from_the_host_after_the_run_s_entry(family: str, mode: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call moves the run's features from the prompts' CPU tensors to the device, once per run (the
    control: the watch sees host copies); the later calls copy nothing from the host."""
    m = on_meta(family, mode, monkeypatch)
    first, *later = watches = [HostCopies() for _ in range(3)]
    sampling_steps(m, family, steps=3, watches=watches)
    assert first.seen and runtime(m).runs.built == 1
    assert [w.seen for w in later] == [[], []]


def test_a_start_end_window_reads_the_sampler_sigma_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: a read in the per-call path does fail here. An adapter limited to part of the run (start /
    end percent) decides at each U-Net call whether the sampler's sigma lies in its window: float(sigma), a read
    per call, as ComfyUI's own ConditioningSetTimestepRange makes (comfy/samplers.py get_area_and_mult). The
    default window, the whole run, decides nothing per call (the test above)."""
    m = on_meta("sd15", "clip", monkeypatch)
    rt = runtime(m)
    rt.start_percent, rt.whole_run = 0.2, False  # as apply_adapter(start_percent=0.2) sets them
    # begin_run turns the window into sigmas once per run, with the model's own sampling (on the CPU here)
    cpu_sampling = UNETS["sd15"][0]().get_model_object("model_sampling")
    with pytest.raises(READ_ERRORS, match="meta"):
        sampling_steps(m, "sd15", steps=1, model_sampling=cpu_sampling)
    assert rt.sigma_end < rt.sigma_start < 1e6  # (the window was set: the read is the per-call one)


@pytest.mark.parametrize("family, mode", [("sd15", "clip"), ("sdxl", "llm")])
def test_a_training_step_reads_no_device_value(family: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward of a training call, as training/loop.py makes it: the batch's features on the device,
    its key mask also on the host. Every adapter parameter gets its gradient, and nothing is read."""
    m = on_meta(family, mode, monkeypatch)
    features = make_features([5, 11], seed=3)
    on_device = LLMFeatures(features.spec, features.hidden.to(META), features.scores.to(META), features.mask.to(META))
    x, sigma, context, y = meta_inputs(family)
    with HostCopies() as copies:  # (the host mask decides the span on the host; it is never moved)
        out = diffusion_output(m, x, sigma, context, y, CONDLLMDiff(on_device).concat([]),
                               TrainingCall(host_mask=features.mask))
        out.square().mean().backward()
    assert copies.seen == []
    adapter = runtime(m).adapter
    missing = [n for n, p in adapter.named_parameters() if p.grad is None or p.grad.device != META]
    assert missing == ["encoder.rho"]  # the Langevin noise's scales: no noise here (see the module's docstring)

    with pytest.raises(READ_ERRORS, match="meta"):  # the control: without the host mask, the span is decided on
        # the device's mask
        diffusion_output(m, x, sigma, context, y, CONDLLMDiff(on_device).concat([]), TrainingCall())
