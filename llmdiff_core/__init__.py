"""The LLMDiff method itself (score encoding, adapter, U-Net patching, file format, training).

Importable without the ComfyUI graph; modules that need ComfyUI import it lazily."""

__version__ = "0.1.0"
