"""LLMDiffInspect: the adapter's per-layer fusion weights as an image (the paper's Figure 5), and what it
needs in a graph as text."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..llmdiff_core.adapter_notes import adapter_notes
from ..llmdiff_core.gate_plot import image_to_comfy, plot_gates
from .sockets import ADAPTER, CATEGORY


class LLMDiffInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffInspect",
            display_name="Inspect LLMDiff Adapter",
            category=CATEGORY,
            description="Plots w_orig and w_new per cross-attention layer and the score weights g_l per LLM block, "
                        "and says what the adapter needs in a graph (base model, LLM, mode, CLIP layer, training).",
            inputs=[
                ADAPTER.Input("adapter", tooltip="From Adapter Loader (LLMDiff)."),
                io.Int.Input("width", default=1024, min=256, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=768, min=256, max=4096, step=8, tooltip="Image height in pixels."),
            ],
            outputs=[io.Image.Output(),
                     io.String.Output("notes", display_name="notes",
                                      tooltip="What the adapter was trained for and with, and how to wire it "
                                              "(connect Preview as Text to read it).")],
        )

    @classmethod
    def execute(cls, adapter, width: int, height: int) -> io.NodeOutput:
        return io.NodeOutput(image_to_comfy(plot_gates(adapter, width=width, height=height)),
                             adapter_notes(adapter.config))
