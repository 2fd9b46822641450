"""ComfyUI-LLMDiff: decoder-only LLMs control SD1.5 / SDXL U-Nets through the LLMDiff adapter.

ComfyUI entry point. Registers the V3 nodes; nothing heavy happens at import.
"""

# pytest imports this file as a bare module when it collects the checkout (whose folder name, e.g.
# "ComfyUI-LLMDiff", is no Python identifier): there is no package then, and nothing to register.
if __package__:
    from . import llmdiff_core  # noqa: F401  (light: torch is already loaded by ComfyUI)
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
