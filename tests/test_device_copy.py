"""The batch's host->device move (llmdiff_core.training.device_copy), checked without a GPU: CUDA's side is
stood in for (what is page-locked, a page-locked allocation, each .to() call), since the suite never needs a GPU;
the staging itself is the real features.moved. bench/gpu_checks.py check 6 watches the same on a real GPU."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

import comfy.model_management as mm

from llmdiff_core.training import device_copy

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Page-locking and copies to "cuda" recorded instead of done: moves holds (page-locked, non_blocking) per
    .to() call; ComfyUI pins memory (as on a CUDA machine) unless a test says otherwise."""
    state: dict[str, Any] = {"pinned": set(), "moves": []}
    empty = torch.empty

    def pinned_empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        out = empty(*args, **kwargs)
        if pin_memory:
            state["pinned"].add(out.data_ptr())
        return out

    def is_pinned(self: torch.Tensor) -> bool:
        return self.data_ptr() in state["pinned"]

    def to(self: torch.Tensor, device: Any = None, dtype: Any = None, non_blocking: bool = False) -> torch.Tensor:
        state["moves"].append((is_pinned(self), non_blocking))
        return self

    monkeypatch.setattr(torch, "empty", pinned_empty)
    monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 1 << 30, raising=False)
    return state


def _batch(fake_cuda: dict[str, Any]) -> dict[str, Any]:
    """A cached batch as the trainer hands it over: page-locked features, pageable rest (as _host_inputs makes them)."""
    scores = torch.randn(2, 3, 5, 8)
    fake_cuda["pinned"].add(scores.data_ptr())  # collate(pin=True)
    return {"latents": torch.randn(2, 4, 8, 8), "scores": scores, "context": torch.randn(2, 77, 16),
            "layers": (0,), "num_tokens": 5, "host_mask": device_copy.HostOnly(torch.ones(2, 5, dtype=torch.bool))}


def test_a_batch_copied_on_the_side_stream_is_all_page_locked_so_no_copy_blocks(fake_cuda: dict[str, Any]) -> None:
    batch = _batch(fake_cuda)
    out = device_copy.to_device(batch, CUDA, pin=True)
    assert fake_cuda["moves"] == [(True, True)] * 3  # latents, scores, context
    assert out["scores"] is batch["scores"]  # already page-locked: not staged again
    assert out["latents"] is not batch["latents"] and torch.equal(out["latents"], batch["latents"])  # staged
    assert (out["layers"], out["num_tokens"], out["host_mask"]) == (batch["layers"], 5, batch["host_mask"])


def test_without_pinning_a_pageable_tensor_is_copied_blocking(fake_cuda: dict[str, Any]) -> None:
    """The control, and the path of the copies on the training thread's own stream (no side stream)."""
    device_copy.to_device(_batch(fake_cuda), CUDA)
    assert fake_cuda["moves"] == [(False, False), (True, True), (False, False)]


def test_no_staging_where_comfyui_pins_no_memory(fake_cuda: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """--disable-pinned-memory (or a GPU ComfyUI pins nothing for) holds for training's copies too: plain copies."""
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1, raising=False)
    device_copy.to_device(_batch(fake_cuda), CUDA, pin=True)
    assert fake_cuda["moves"] == [(False, False), (True, True), (False, False)]


def test_page_locked_memory_refused_gives_plain_copies(fake_cuda: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the platform refuses page-locked memory (WSL caps it) the batch still reaches the device."""
    empty = torch.empty

    def refusing(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refusing)
    device_copy.to_device(_batch(fake_cuda), CUDA, pin=True)
    assert fake_cuda["moves"] == [(False, False), (True, True), (False, False)]


def test_a_cpu_device_neither_pins_nor_copies_without_blocking(fake_cuda: dict[str, Any]) -> None:
    batch = _batch(fake_cuda)
    before = set(fake_cuda["pinned"])
    device_copy.to_device(batch, torch.device("cpu"), pin=True)
    assert fake_cuda["pinned"] == before  # nothing staged
    assert [pinned for pinned, _ in fake_cuda["moves"]] == [False, True, False]
    assert not any(non_blocking for _, non_blocking in fake_cuda["moves"])


def test_the_prefetch_thread_s_side_stream_stager_pins_what_it_copies(fake_cuda: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """DeviceStager.start, the prefetch thread's call, with CUDA's stream and event stood in for too."""

    class Stream:
        def __init__(self, device: Any = None) -> None:
            pass

    class Event:
        def record(self, stream: Any = None) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    stager = device_copy.DeviceStager(CUDA, side_stream=True)
    staged = stager.start(_batch(fake_cuda))
    assert isinstance(staged, device_copy.InFlight)
    assert fake_cuda["moves"] == [(True, True)] * 3
