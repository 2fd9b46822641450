"""ComfyUI nodes of the pack (V3 schema). Node ids are forever: never rename one."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class LLMDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> LLMDiffExtension:
    return LLMDiffExtension()
