"""ComfyUI-LLMDiff: decoder-only LLMs control SD1.5 / SDXL U-Nets through the LLMDiff adapter.

ComfyUI entry point. Registers the V3 nodes; nothing heavy happens at import.
"""

from . import llmdiff_core  # noqa: F401  (light: torch is already loaded by ComfyUI)
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
