"""The batch's host->device move (llmdiff_core.training.device_copy), checked without a GPU: CUDA's side is
stood in for on torch.Tensor (what is page-locked, and each .to() call), since the suite never needs a GPU.
bench/gpu_checks.py check 6 watches the same on a real one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llmdiff_core.training import device_copy


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Page-locking and copies to "cuda" recorded instead of done: moves holds (key, page-locked, non_blocking)."""
    state: dict[str, Any] = {"pinned": set(), "moves": []}
    names: dict[int, str] = {}

    def is_pinned(self: torch.Tensor) -> bool:
        return self.data_ptr() in state["pinned"]

    def pin_memory(self: torch.Tensor) -> torch.Tensor:
        out = self.clone()
        state["pinned"].add(out.data_ptr())
        names[out.data_ptr()] = names.get(self.data_ptr(), "?")
        return out

    def to(self: torch.Tensor, device: Any, non_blocking: bool = False) -> torch.Tensor:
        state["moves"].append((names.get(self.data_ptr(), "?"), is_pinned(self), non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    def name(key: str, t: torch.Tensor) -> torch.Tensor:  # how the moves name the tensor (and its pinned copy)
        names[t.data_ptr()] = key
        return t

    state["name"] = name
    return state


def _batch(fake_cuda: dict[str, Any]) -> dict[str, Any]:
    """A cached batch as the trainer hands it over: page-locked features, pageable rest (as _host_inputs makes them)."""
    name = fake_cuda["name"]
    scores = name("scores", torch.randn(2, 3, 5, 8))
    fake_cuda["pinned"].add(scores.data_ptr())  # collate(pin=True)
    return {"latents": name("latents", torch.randn(2, 4, 8, 8)), "scores": scores,
            "context": name("context", torch.randn(2, 77, 16)), "layers": (0,), "num_tokens": 5,
            "host_mask": device_copy.HostOnly(torch.ones(2, 5, dtype=torch.bool))}


def test_a_batch_copied_on_the_side_stream_is_all_page_locked_so_no_copy_blocks(fake_cuda: dict[str, Any]) -> None:
    batch = _batch(fake_cuda)
    out = device_copy.to_device(batch, torch.device("cuda"), pin=True)
    assert fake_cuda["moves"] == [("latents", True, True), ("scores", True, True), ("context", True, True)]
    assert out["scores"] is batch["scores"]  # already page-locked: not copied again
    assert (out["layers"], out["num_tokens"], out["host_mask"]) == (batch["layers"], 5, batch["host_mask"])
    assert torch.equal(out["latents"], batch["latents"])


def test_without_pinning_a_pageable_tensor_is_copied_blocking(fake_cuda: dict[str, Any]) -> None:
    """The control, and the path of the copies on the training thread's own stream (no side stream)."""
    device_copy.to_device(_batch(fake_cuda), torch.device("cuda"))
    assert fake_cuda["moves"] == [("latents", False, False), ("scores", True, True), ("context", False, False)]


def test_a_cpu_device_neither_pins_nor_copies_without_blocking(fake_cuda: dict[str, Any]) -> None:
    device_copy.to_device(_batch(fake_cuda), torch.device("cpu"), pin=True)
    assert fake_cuda["moves"] == [("latents", False, False), ("scores", True, False), ("context", False, False)]


def test_the_prefetch_thread_s_side_stream_stager_pins_what_it_copies(fake_cuda: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """DeviceStager.start, the prefetch thread's call, with CUDA's stream and event stood in for too."""
    import contextlib

    class Stream:
        def __init__(self, device: Any = None) -> None:
            pass

    class Event:
        def record(self, stream: Any = None) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    stager = device_copy.DeviceStager(torch.device("cuda"), side_stream=True)
    staged = stager.start(_batch(fake_cuda))
    assert isinstance(staged, device_copy.InFlight)
    assert fake_cuda["moves"] == [("latents", True, True), ("scores", True, True), ("context", True, True)]
