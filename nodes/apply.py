"""LLMDiffApply / LLMDiffApplyAdvanced: MODEL + adapter -> patched MODEL clone."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..llmdiff_core.block_weights import block_weights_for
from ..llmdiff_core.comfy_patch import apply_adapter
from .sockets import ADAPTER, CATEGORY

STRENGTH_TOOLTIP = ("How much of the adapter to use: 1 = as trained, 0 = the unpatched model "
                    "(hybrid adapters). Scales the LLM path and moves the original path's weight toward 1.")


def _common_inputs() -> list[io.Input]:
    return [
        io.Model.Input("model", tooltip="The SD1.5 or SDXL model the adapter was trained for."),
        ADAPTER.Input("adapter", tooltip="From Adapter Loader (LLMDiff)."),
        io.Float.Input("strength", default=1.0, min=-2.0, max=3.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress (0 = first step) at which the adapter starts acting."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress after which the adapter stops acting."),
    ]


class LLMDiffApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffApply",
            display_name="Apply LLMDiff Adapter",
            category=CATEGORY,
            description="Patches every cross-attention layer of the U-Net with the adapter. Encode both prompts "
                        "with Text Encode (LLMDiff).",
            inputs=_common_inputs(),
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, adapter, strength: float, start_percent: float, end_percent: float) -> io.NodeOutput:
        return io.NodeOutput(apply_adapter(model, adapter, strength=strength, start_percent=start_percent,
                                           end_percent=end_percent))


class LLMDiffApplyAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        weight = dict(default=1.0, min=-2.0, max=3.0, step=0.01)
        return io.Schema(
            node_id="LLMDiffApplyAdvanced",
            display_name="Apply LLMDiff Adapter (Advanced)",
            category=CATEGORY,
            description="Apply LLMDiff Adapter with a weight per U-Net block group and per layer.",
            inputs=_common_inputs() + [
                io.Float.Input("input_weight", **weight, tooltip="Multiplies strength in the down (input) blocks."),
                io.Float.Input("middle_weight", **weight, tooltip="Multiplies strength in the middle block."),
                io.Float.Input("output_weight", **weight, tooltip="Multiplies strength in the up (output) blocks."),
                io.String.Input("layer_weights", default="", multiline=False,
                                tooltip="Overrides per layer as 'index:weight, ...' by SpatialTransformer index in "
                                        "forward order (SD1.5 0-15, SDXL 0-10), e.g. '0:0.5, 6:1.2'."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, adapter, strength: float, start_percent: float, end_percent: float,
                input_weight: float, middle_weight: float, output_weight: float, layer_weights: str) -> io.NodeOutput:
        weights = block_weights_for(adapter.config.sites, input_weight, middle_weight, output_weight, layer_weights)
        return io.NodeOutput(apply_adapter(model, adapter, strength=strength, start_percent=start_percent,
                                           end_percent=end_percent, block_weights=weights))
