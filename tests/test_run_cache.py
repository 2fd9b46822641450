"""run_cache: which entries a run finds, what it keeps for the next, and when weights count as changed."""

from __future__ import annotations

import torch
from torch import nn

from llmdiff_core.run_cache import RunCache, WeightsSnapshot


def test_weights_snapshot_sees_in_place_changes_and_new_tensors() -> None:
    module = nn.Linear(3, 2)
    snap = WeightsSnapshot(module)
    assert snap.is_current(module)
    with torch.no_grad():
        module.weight.add_(0.0)  # in place, even without a change of value: the version counter moves
    assert not snap.is_current(module)
    snap = WeightsSnapshot(module)
    module.bias = nn.Parameter(module.bias.detach().clone())  # the same values in a new tensor
    assert not snap.is_current(module)
    snap = WeightsSnapshot(module)
    module.register_buffer("scale", torch.ones(1))  # another tensor
    assert not snap.is_current(module)
    assert WeightsSnapshot(module).is_current(module)


def test_weights_snapshot_of_inference_tensors_goes_by_the_objects() -> None:
    """ComfyUI runs nodes under inference_mode: a loader's weights keep no version counter there."""
    with torch.inference_mode():
        module = nn.Linear(3, 2)
    snap = WeightsSnapshot(module)
    with torch.inference_mode():
        module.weight.mul_(1.0)
    assert snap.is_current(module)  # (not visible: such tensors change only in inference_mode, by their owner)
    with torch.inference_mode():
        module.weight = nn.Parameter(torch.zeros(2, 3))
    assert not snap.is_current(module)


def test_run_cache_keeps_one_runs_entries_for_the_next_run() -> None:
    module = nn.Linear(2, 2)
    cache: RunCache[str] = RunCache(across_runs=True)
    assert not cache.active
    cache.begin(module)
    assert cache.find(lambda e: True) is None
    cache.add("a")
    cache.add("b")
    assert cache.find(lambda e: e == "b") == "b"
    cache.end()
    assert cache.kept == ["a", "b"] and cache.this_run == [] and not cache.active

    cache.begin(module)  # the next run finds them; only what it uses is kept after it
    assert cache.find(lambda e: e == "b") == "b" and cache.this_run == ["b"]
    cache.add("c")
    cache.end()
    assert cache.kept == ["b", "c"]

    with torch.no_grad():
        module.weight.mul_(2.0)
    cache.begin(module)  # other weights: nothing to find
    assert cache.find(lambda e: e == "b") is None
    cache.end()
    assert cache.kept == []  # (a run that cached nothing keeps nothing)

    cache.begin(module)
    cache.add("d")
    cache.end()
    cache.forget()
    cache.begin(module)
    assert cache.find(lambda e: e == "d") is None
    cache.end()


def test_run_cache_within_runs_only() -> None:
    module = nn.Linear(2, 2)
    cache: RunCache[str] = RunCache(across_runs=False)
    cache.begin(module)
    cache.add("a")
    assert cache.find(lambda e: e == "a") == "a"
    cache.end()
    assert cache.kept == []
    cache.begin(module)
    assert cache.find(lambda e: e == "a") is None
    cache.end()
