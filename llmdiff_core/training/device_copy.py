"""A batch's tensors to the training device; on CUDA, copied by the prefetch thread on a side stream.

Copied by the training thread, a batch's host->device copy (an 8B LLM's cached scores: ~294 MiB per SD1.5
batch of 16) runs on the compute stream between two steps, and the device does nothing else meanwhile:
~7 ms per step on an H200 (docs/benchmarks.md §5d). The prefetch thread instead issues the copies on a
stream of their own as soon as the batch is collated, so they run on the copy engine while the device
computes the current step, and the compute stream waits for them only where the next step begins.

Every copy on the side stream reads page-locked memory: torch copies a pageable tensor to CUDA and then
synchronises the stream (at::cuda::memcpy_and_sync), so one pageable tensor (the latents, the noise, CLIP's
context) issued after the features held the prefetch thread until the whole batch's copy (~294 MiB) had
crossed the bus. The features are collated into page-locked buffers (feature_cache.collate(pin=True)); the
few small rest go through features.moved, the sampling run's staging (a memcpy of ~6 MiB for SD1.5 at batch 16;
plain copies where ComfyUI pins no memory, --disable-pinned-memory, or the platform refuses it).

Safety, as in torch's own prefetching loaders:
- the caching host allocator keeps a page-locked buffer until the copy reading it has finished, even
  when the buffer is freed first;
- the compute stream waits on an event recorded after the copies (wait_event: no host sync);
- each device tensor is record_stream'ed on the compute stream: the caching allocator made it on the
  side stream and would otherwise hand its memory to the next batch's copies while the compute stream
  may still read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..features import moved

SIDE_STREAM = True  # off: copies on the compute stream (bench/training_throughput.py --no-copy-stream, the A/B)


@dataclass(frozen=True)
class HostOnly:
    """A tensor that stays on the host on its way into the step: to_device and DDP's input move pass it as it
    is (neither looks into other objects). For what the step decides on the host without a device sync."""

    tensor: torch.Tensor


def to_device(host: Mapping[str, Any], device: torch.device, pin: bool = False) -> dict[str, Any]:
    """The tensors of host on device (page-locked ones without blocking the host); other values as they are.
    pin: the pageable ones through a page-locked staging copy too (features.moved), so that no copy blocks."""
    cuda = device.type == "cuda"

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if pin and not t.is_pinned():
            return moved(t, device)
        return t.to(device, non_blocking=cuda and t.is_pinned())
    return {k: move(v) for k, v in host.items()}


@dataclass(frozen=True)
class InFlight:
    """A batch whose copies were issued on the side stream; `copied` is recorded after the last one."""

    tensors: dict[str, Any]
    copied: torch.cuda.Event


class DeviceStager:
    """start() issues a batch's copies (in any thread); finish() hands the batch to the training thread's
    stream. Without a side stream (not CUDA, or side_stream False) start() does nothing and finish() copies."""

    def __init__(self, device: torch.device, side_stream: bool) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None

    def start(self, host: dict[str, Any]) -> dict[str, Any] | InFlight:
        if self.stream is None:
            return host
        with torch.cuda.stream(self.stream):
            tensors = to_device(host, self.device, pin=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return InFlight(tensors, copied)

    def finish(self, staged: dict[str, Any] | InFlight) -> dict[str, Any]:
        if not isinstance(staged, InFlight):
            return to_device(staged, self.device)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(staged.copied)
        for t in staged.tensors.values():
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                t.record_stream(compute)
        return staged.tensors
