"""Socket types of the pack: namespaced so they never collide with another pack's "LLM"."""

from comfy_api.v0_0_2 import io

LLM = io.Custom("LLMDIFF_LLM")
ADAPTER = io.Custom("LLMDIFF_ADAPTER")
CATEGORY = "conditioning/llmdiff"
