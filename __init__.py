"""ComfyUI entry point of the Lipschitz personalization pack (V3 node schema)."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODES
from .nodes.host import routes as _routes

# Frontend extension (live training chart): every .js under ./web is loaded by the frontend.
WEB_DIRECTORY = "./web"

# GET /lipschitz/status (read-only, for the chart to refill after a reload). A no-op when no
# PromptServer runs (e.g. the pack imported by pytest).
_routes.register()


class LipschitzExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LipschitzExtension:
    return LipschitzExtension()
