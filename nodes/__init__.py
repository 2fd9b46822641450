"""ComfyUI nodes of the pack (V3 schema). Node ids are forever: never rename one."""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from ..llmdiff_core.paths import register_model_folders
from .apply import LLMDiffApply, LLMDiffApplyAdvanced
from .encode import LLMDiffTextEncode
from .inspect import LLMDiffInspect
from .loaders import LLMDiffAdapterLoader, LLMDiffLLMLoader

# At import, not in on_load(): ComfyUI 0.3.75 never calls ComfyExtension.on_load().
register_model_folders()

NODES: list[type[io.ComfyNode]] = [
    LLMDiffLLMLoader, LLMDiffTextEncode, LLMDiffAdapterLoader, LLMDiffApply, LLMDiffApplyAdvanced, LLMDiffInspect,
]


class LLMDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LLMDiffExtension:
    return LLMDiffExtension()
