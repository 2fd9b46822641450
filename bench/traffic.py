"""Memory traffic of a step, counted op by op, and the per-kernel roofline it implies.

ByteCounter is a TorchDispatchMode that adds, for every aten op that touches memory, the bytes of its tensor
inputs (read) and outputs (written): what the op would move if it ran as one kernel, i.e. an eager step's
traffic with no fusion across ops. Views, aliases and allocations move nothing. A broadcast (stride-0)
dimension is read once. It also keeps each call's FLOPs (torch's flop registry), so kernel_bound() gives the
eager step's roofline: the sum over kernels of max(FLOPs / peak, bytes / bandwidth), a kernel being either
compute- or memory-bound. Works on the meta device, so real shapes cost no memory.

fused_sdpa() routes F.scaled_dot_product_attention to the memory-efficient attention op while counting: on
the meta device torch would otherwise decompose it into bmm + softmax + bmm and count the full attention
matrix (4 GB per SD1.5 self-attention layer at batch 16), which no GPU kernel writes. The efficient op has
meta kernels and an autograd formula, so its forward and backward are counted as the fused kernels they are
(FlopCounterMode counts the same FLOPs for it as for the decomposition).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any, Iterator

import torch
from common import H100_BYTES, H100_FLOPS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_leaves

# ops that move no data (their outputs alias their inputs, or are fresh allocations)
_NO_TRAFFIC = {"detach", "alias", "lift_fresh", "_unsafe_view", "_reshape_alias", "resolve_conj", "resolve_neg",
               "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "_local_scalar_dense"}


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel reads or writes for t: its elements, a broadcast (stride-0) dimension counted once."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)
    return n * t.element_size()


def _moves_memory(func: Any) -> bool:
    return not func.is_view and func.overloadpacket.__name__ not in _NO_TRAFFIC


class ByteCounter(TorchDispatchMode):
    """Bytes read + written per aten op while active: `total` and `by_op` (op name -> bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, float] = defaultdict(float)
        self.calls: list[tuple[float, float]] = []  # (FLOPs, bytes) per op call that moves memory
        self.call_ops: list[str] = []  # the op of each entry of calls

    @property
    def total(self) -> float:
        return float(sum(self.by_op.values()))

    def kernel_bound(self, flops_per_s: float = H100_FLOPS, bytes_per_s: float = H100_BYTES) -> tuple[float, float]:
        """(seconds at least, of which memory-bound kernels): every call one kernel, as long as the slower of its
        math and its memory traffic. The memory-bound part is what fusing kernels can cut."""
        times = [(f / flops_per_s, b / bytes_per_s) for f, b in self.calls]
        return sum(max(t) for t in times), sum(tb for tf, tb in times if tb > tf)

    def per_op(self, flops_per_s: float = H100_FLOPS, bytes_per_s: float = H100_BYTES) -> dict[str, list[float]]:
        """op -> [calls, FLOPs, bytes, roofline seconds]: kernel_bound() split by op, to set beside a profile's
        device time per op (how far each op's kernels are from their bound)."""
        out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
        for op, (f, b) in zip(self.call_ops, self.calls):
            row = out[op]
            row[0] += 1
            row[1] += f
            row[2] += b
            row[3] += max(f / flops_per_s, b / bytes_per_s)
        return dict(out)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if _moves_memory(func):
            seen: set[int] = set()
            moved = 0
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and id(t) not in seen:  # an in-place op's output is its input:
                    seen.add(id(t))  # read and written, but one tensor here; count it once more below
                    moved += footprint(t)
            if func._schema.is_mutable:  # in place: the mutated tensor is read and written
                moved += sum(footprint(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            self.by_op[func.overloadpacket.__name__] += moved
            count = flop_registry.get(func.overloadpacket)
            self.calls.append((float(count(*args, **(kwargs or {}), out_val=out)) if count else 0.0, float(moved)))
            self.call_ops.append(func.overloadpacket.__name__)
        return out


@contextlib.contextmanager
def fused_sdpa() -> Iterator[None]:
    """F.scaled_dot_product_attention as the memory-efficient attention op (forward and backward kernels)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  **kwargs: Any) -> torch.Tensor:
        bias = attn_mask
        if bias is not None:
            if bias.dtype == torch.bool:  # True = attend -> additive
                bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
            bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, grad, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
