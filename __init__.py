"""ComfyUI entry point of the Lipschitz personalization pack (V3 node schema)."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class LipschitzExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LipschitzExtension:
    return LipschitzExtension()
