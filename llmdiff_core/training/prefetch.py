"""Batches prepared in background threads while the training step runs on the current one."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

S = TypeVar("S")
T = TypeVar("T")


class Prefetcher(Generic[S, T]):
    """Prepares the next `depth` micro-batches in background threads while the caller trains on the current
    one, so the host work of a batch (cache read, collate into a pinned buffer, noise draws) and, on CUDA, its
    copy to the device (device_copy) overlap the device's compute instead of following it.

    A batch is prepared in two parts: select() picks its samples from the data stream, one batch at a time and
    in order (the stream and the samples waiting in their buckets are not for two threads at once), then
    build(selected) reads and collates them, which the threads do side by side: with the step under CUDA graphs
    (SD1.5 on an H200, session 28) one thread's 86 ms a batch was longer than the step's 77 ms of compute.

    Only for pure host work: the trainer uses it when batches come from the feature cache (on-the-fly
    encoding runs models through ComfyUI's model management, which is not thread-safe). The order of
    batches is unchanged, and the run state moves only when a batch is taken (Trainer.take_batch), so a
    checkpoint never counts a batch that was prepared but not trained on.
    """

    def __init__(self, select: Callable[[], S], build: Callable[[S], T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth {depth}: at least 1")
        self._select, self._build, self.depth = select, build, depth
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="llmdiff-prefetch")
        self._queued: deque[Future[T]] = deque()
        self._turn = threading.Condition()
        self._submitted = 0  # tickets handed out: the order batches are selected in
        self._selected = 0  # tickets whose select() has run

    def _prepare(self, ticket: int) -> T:
        with self._turn:  # select in ticket order, whichever thread comes first
            self._turn.wait_for(lambda: self._selected == ticket)
            try:
                selected = self._select()
            finally:
                self._selected += 1
                self._turn.notify_all()
        return self._build(selected)

    def _fill(self) -> None:
        while len(self._queued) < self.depth:
            self._queued.append(self._pool.submit(self._prepare, self._submitted))
            self._submitted += 1

    def take(self) -> T:
        """The next prepared batch (or what preparing it raised); the one `depth` after it starts."""
        self._fill()
        result = self._queued.popleft().result()
        self._fill()
        return result

    def close(self) -> None:
        """Waits for the batches in preparation and drops them (their entries are read again after a resume)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queued.clear()
