"""A sampling run's per-site tensors, stacked where their shapes agree: few inputs for a compiled U-Net.

Inductor's CUDA graphs (TorchCompileModel with mode reduce-overhead, or its cudagraphs backend) copy every
tensor input that is not a parameter into the graph's own buffers at every replay, one copy and launch per
tensor. A run's keys, gate-scaled values and fusion gates are per site (SD1.5: 16 sites, SDXL: 70): as
separate inputs that was 49 copies per SD1.5 step (H100, docs/benchmarks.md §5g) and ~210 per SDXL step. Stacked
by shape (SD1.5: three head widths, SDXL: one) a step copies a handful, whatever the number of sites.

A compiled U-Net reads a site's tensor as a slot of its stack (the stack is the graph's input, the slot a view
inside the graph); eager code reads per-site views made once, so an eager step indexes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SiteStack:
    """Per-site tensors of one kind (say every site's keys), stacked by shape.

    stacks: one [S_g, ...] tensor per shape group; where: per site, (group, slot); views: per site,
    stacks[group][slot], made once.
    """

    stacks: tuple[torch.Tensor, ...]
    where: tuple[tuple[int, int], ...]
    views: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, per_site: Sequence[torch.Tensor],
           on_stack: Callable[[torch.Tensor], object] | None = None) -> SiteStack:
        """Stacks per_site (a copy into fresh contiguous stacks: the per-site tensors, views or not, can go).
        on_stack sees each new stack (to mark a dim as varying for torch.compile)."""
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(per_site):
            groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
        where: list[tuple[int, int]] = [(0, 0)] * len(per_site)
        stacks = []
        for g, members in enumerate(groups.values()):
            stacks.append(torch.stack([per_site[i] for i in members]))
            for j, i in enumerate(members):
                where[i] = (g, j)
        return cls._made(stacks, where, on_stack)

    @classmethod
    def one(cls, stack: torch.Tensor) -> SiteStack:
        """A stack that is already one group: site i's tensor is stack[i] (hybrid's fusion gates, a [N] vector)."""
        return cls._made([stack], [(0, i) for i in range(stack.shape[0])], None)

    @classmethod
    def _made(cls, stacks: list[torch.Tensor], where: Sequence[tuple[int, int]],
              on_stack: Callable[[torch.Tensor], object] | None) -> SiteStack:
        if on_stack is not None:
            for s in stacks:
                on_stack(s)
        return cls(tuple(stacks), tuple(where), tuple(stacks[g][j] for g, j in where))

    def site(self, i: int) -> torch.Tensor:
        """Site i's tensor: while torch.compile traces, a slot of its stack (so the graph's input is the stack);
        in eager code the view made once."""
        if torch.compiler.is_compiling():
            g, j = self.where[i]
            return self.stacks[g][j]
        return self.views[i]

    def scaled(self, gains: Sequence[float], on_stack: Callable[[torch.Tensor], object] | None = None) -> SiteStack:
        """Site i's tensor times gains[i], as `tensor * gains[i]` computes it (the same bits); a group whose gains
        are all 1 keeps its stack."""
        if len(gains) != len(self.where):
            raise ValueError(f"{len(gains)} gains for {len(self.where)} sites")
        stacks = []
        for g, stack in enumerate(self.stacks):
            members = [i for i, (group, _) in enumerate(self.where) if group == g]
            if all(gains[i] == 1.0 for i in members):
                stacks.append(stack)
                continue
            out = torch.empty_like(stack)
            for i in members:
                j = self.where[i][1]
                torch.mul(stack[j], gains[i], out=out[j])
            stacks.append(out)
        return self._made(stacks, self.where, on_stack)
