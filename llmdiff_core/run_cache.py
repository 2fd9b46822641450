"""An applied adapter's once-per-run entries: kept for their run and, where allowed, for the next run.

A sampling run computes everything the adapter derives from its prompts once (run_entry.RunEntry: the
features moved, encoded, every site's keys and values). ComfyUI runs the sampler again with the very same
conditioning objects when only the seed, the steps or the sampler change (its node cache keeps Text Encode's
output). Rebuilding the entry then costs each such run again; its step 1 was ~20 ms slower than the
unpatched model's on an H100 (SD1.5, docs/benchmarks.md §5g; how much of it is the entry, §3r).
So a run's entries are kept for the next run, which takes them while the module they came from still has the
same weights (WeightsSnapshot) and drops the ones it did not use: at most one run's entries are held.

What they hold is on the U-Net's device, outside ComfyUI's model management; the owner drops them (forget)
when ComfyUI unloads the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Entry = TypeVar("Entry")


class WeightsSnapshot:
    """Which tensors a module holds, and their version counters, at one moment.

    Still current when the module holds the same tensor objects (a reload or a re-assigned parameter is a new
    object) and none of them was changed in place since (an optimizer step, an EMA copy, load_state_dict bump a
    tensor's version counter). Tensors made under torch.inference_mode (ComfyUI runs its nodes there, so a
    loader node's weights are such) keep no version counter and cannot be changed in place outside it: for them
    the object is what counts. Weak references: the snapshot keeps nothing alive.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self._held = [(weakref.ref(t), self._version(t)) for t in self._tensors(module)]

    @staticmethod
    def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    @staticmethod
    def _version(t: torch.Tensor) -> int | None:
        return None if t.is_inference() else t._version

    def is_current(self, module: torch.nn.Module) -> bool:
        tensors = self._tensors(module)
        return len(tensors) == len(self._held) and all(
            ref() is t and self._version(t) == version for (ref, version), t in zip(self._held, tensors))


class RunCache(Generic[Entry]):
    """The entries of the current run (`active` inside one) and, with across_runs, the last run's entries.

    begin(module) starts a run; the last run's entries are candidates while module's weights are the ones
    they were built from. find() looks among this run's entries, then the candidates (a candidate found is
    this run's from then on); add() records a new one; end() keeps this run's entries (across_runs) or
    nothing, and forget() drops what is kept.
    """

    def __init__(self, across_runs: bool) -> None:
        self.across_runs = across_runs
        self._run: list[Entry] | None = None  # None outside a run: nothing is cached
        self._candidates: list[Entry] = []
        self._kept: list[Entry] = []
        self._kept_weights: WeightsSnapshot | None = None
        self._run_weights: WeightsSnapshot | None = None
        self.built = self.reused = 0  # this (or the last) run's entries: added, and found among the candidates

    @property
    def active(self) -> bool:
        return self._run is not None

    @property
    def this_run(self) -> list[Entry]:
        return list(self._run or [])

    @property
    def kept(self) -> list[Entry]:
        return list(self._kept)

    def begin(self, module: torch.nn.Module) -> None:
        reusable = (self.across_runs and self._kept_weights is not None and self._kept_weights.is_current(module))
        self._candidates = self._kept if reusable else []
        self._kept, self._kept_weights = [], None
        self._run = []
        self._run_weights = WeightsSnapshot(module) if self.across_runs else None
        self.built = self.reused = 0

    def find(self, matches: Callable[[Entry], bool]) -> Entry | None:
        assert self._run is not None, "find() outside a run"
        for entry in self._run:
            if matches(entry):
                return entry
        for i, entry in enumerate(self._candidates):
            if matches(entry):
                self._run.append(self._candidates.pop(i))
                self.reused += 1
                return entry
        return None

    def add(self, entry: Entry) -> None:
        assert self._run is not None, "add() outside a run"
        self._run.append(entry)
        self.built += 1

    def end(self) -> None:
        if self.across_runs and self._run:
            self._kept, self._kept_weights = self._run, self._run_weights
        self._run, self._candidates, self._run_weights = None, [], None

    def forget(self) -> None:
        """Drop the kept entries (and the candidates of a run in progress; its own entries stay for it)."""
        self._kept, self._kept_weights, self._candidates = [], None, []
