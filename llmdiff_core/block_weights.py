"""Per-block adapter weights (LLMDiffApplyAdvanced), keyed by transformer_index.

transformer_index numbers the U-Net's SpatialTransformers in forward order: SD1.5 0..15, SDXL 0..10
(the same "layers" IP-Adapter's per-layer weights use).
"""

from __future__ import annotations

from .config import SiteSpec
from .errors import LLMDiffError


def block_weights_for(sites: list[SiteSpec], input_weight: float, middle_weight: float,
                      output_weight: float, layer_weights: str = "") -> dict[int, float]:
    """Group weights for input/middle/output blocks, then 'index:weight, ...' overrides."""
    group = {"input": input_weight, "middle": middle_weight, "output": output_weight}
    weights = {s.transformer_index: group[s.block[0]] for s in sites}
    for index, value in parse_layer_weights(layer_weights).items():
        if index not in weights:
            raise LLMDiffError(f"layer_weights: layer {index} does not exist; this model has layers "
                               f"0..{max(weights)}")
        weights[index] = value
    return weights


def parse_layer_weights(text: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        index, sep, value = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(index)] = float(value)
        except ValueError:
            raise LLMDiffError(f"layer_weights: cannot read '{item}'; write 'index:weight' pairs "
                               f"separated by commas, e.g. '0:1.0, 5:0.5'") from None
    return out
