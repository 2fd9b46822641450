"""A torch.compile backend that audits compiled graphs for what would keep them from running as CUDA graphs.

Inductor's CUDA graphs (mode reduce-overhead) and the cudagraphs backend leave a graph to run without them,
with only a logged warning, when it holds an op CUDA graphs cannot capture, takes inputs that are not tensors
or sizes, or writes to one of its inputs. This backend (AOTAutograd, graphs run as traced) records those per
graph, forward and backward, with torch's own checks, and counts the inputs a replay would copy in and the
ops that compute (not views) in each forward graph. The device check (one device, no CPU tensor) needs CUDA:
bench/gpu_checks.py check 11.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch


class CudaGraphAudit:
    def __init__(self) -> None:
        from torch._dynamo.backends.common import aot_autograd

        self.graphs: list[dict[str, Any]] = []  # forward graphs: what skips CUDA graphs
        self.backward_graphs: list[dict[str, Any]] = []
        self.copied: list[int] = []  # per forward graph: the tensor inputs a CUDA-graph replay copies in (not static)
        self.copied_dtypes: list[Counter[str]] = []  # ... and their dtypes
        self.computing: list[Counter[str]] = []  # per forward graph: its ops that make new data (kernels), by name
        self.backend = aot_autograd(fw_compiler=self._forward, bw_compiler=self._backward)

    @staticmethod
    def _found(gm: torch.fx.GraphModule, example_inputs: Any) -> dict[str, Any]:
        from torch._inductor.utils import get_first_incompatible_cudagraph_node

        incompatible = get_first_incompatible_cudagraph_node(gm)
        return {"incompatible op": None if incompatible is None else str(incompatible.target),
                "non-tensor inputs": [type(t).__name__ for t in example_inputs
                                      if not isinstance(t, (torch.Tensor, torch.SymInt))]}

    def _forward(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        meta = torch._guards.TracingContext.get().fw_metadata
        assert meta is not None, "AOTAutograd's metadata moved: update CudaGraphAudit"
        self.graphs.append({**self._found(gm, example_inputs), "mutated inputs": list(meta.mutated_inp_runtime_indices)})
        static = set(meta.static_input_indices)  # parameters and buffers: their addresses stay put
        copied = [t for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and i not in static]
        self.copied.append(len(copied))
        self.copied_dtypes.append(Counter(str(t.dtype) for t in copied))
        self.computing.append(Counter(
            str(n.target.overloadpacket) for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and not _is_view(n.target)))
        return gm.forward

    def _backward(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        # (AOTAutograd functionalises the joint graph: a backward holds no write to its inputs to look for)
        self.backward_graphs.append(self._found(gm, example_inputs))
        from functorch.compile import make_boxed_func  # (AOTAutograd calls a backward with its inputs boxed)

        return make_boxed_func(gm.forward)


def _is_view(op: torch._ops.OpOverload) -> bool:
    """An aten op whose output aliases its input (a view: no kernel, no data moved). _unsafe_view is AOTAutograd's
    reshape of a tensor nothing else reads: a view too, though its schema does not say so."""
    return (op.overloadpacket is torch.ops.aten._unsafe_view
            or any(a.alias_info is not None and not a.alias_info.is_write for a in op._schema.returns))


def emulate_cudagraphs_backend(monkeypatch: Any) -> dict[str, int]:
    """torch.compile's "cudagraphs" backend, runnable on the CPU: torch's own code (dynamo's backend and
    cudagraph_trees.cudagraphify_impl, which keeps a recording per compiled graph and per value of the graph's
    integer inputs) with only the recording emulated. A recording keeps copies of the inputs it was made with
    (but the static ones: parameters); a replay copies the new inputs into them, as a CUDA-graph replay does
    (copy_ fails on another shape), and runs the graph on the copies. The device checks, which need CUDA, are
    left out. Returns the counts of recordings and replays, updated as the graphs run."""
    import torch._dynamo.backends.cudagraphs as backend
    import torch._inductor.cudagraph_trees as trees

    for module, name in ((backend, "check_for_skip"), (backend, "get_device_index"), (trees, "cudagraphify")):
        assert hasattr(module, name), f"torch's cudagraphs backend changed ({module.__name__}.{name}): update this"
    counts = {"recordings": 0, "replays": 0}

    def record(model: Callable, inputs: list, static_input_idxs: Any = (), **_: Any) -> tuple[Callable, Any]:
        static = set(static_input_idxs)
        kept = [t.clone() if isinstance(t, torch.Tensor) and i not in static else t for i, t in enumerate(inputs)]
        counts["recordings"] += 1

        def replay(new_inputs: list) -> Any:
            counts["replays"] += 1
            for i, (recorded, new) in enumerate(zip(kept, new_inputs)):
                if isinstance(recorded, torch.Tensor) and i not in static:
                    recorded.copy_(new)
            new_inputs.clear()  # (boxed: the caller's list is the callee's to free)
            return model(list(kept))
        return replay, model(list(kept))

    monkeypatch.setattr(backend, "check_for_skip", lambda *a, **k: None)
    monkeypatch.setattr(backend, "get_device_index", lambda gm: 0)
    monkeypatch.setattr(trees, "cudagraphify", record)
    return counts
