"""ComfyUI entry point of the Lipschitz personalization pack (V3 node schema).

ComfyUI imports this folder as a package, reads ``WEB_DIRECTORY`` and awaits
:func:`comfy_entrypoint`.  ComfyUI is imported only there, so that outside ComfyUI (tests,
tools, the headless benchmark) ``lipschitz_personalize.trainer`` imports without it.
"""
from __future__ import annotations

from typing import Any

# Frontend extension (live training chart): every .js under ./web is loaded by the frontend.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> Any:
    """The pack's ``ComfyExtension``; registers GET /lipschitz/status (read-only, for the chart
    to refill after a reload; a no-op when no PromptServer runs)."""
    from .nodes import LipschitzExtension
    from .nodes.host import routes

    routes.register()
    return LipschitzExtension()
