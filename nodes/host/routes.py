"""Read-only HTTP route for the frontend chart: ``GET /lipschitz/status[?node=<id>]``.

Returns the in-memory progress of the personalization nodes (:func:`.progress.snapshot`) as
JSON, ``{node_id: {"node", "total", "lambda", "state", "events": [...]}}``, so that the chart
can refill after a browser reload. It reads no file and changes nothing. ComfyUI also serves
it under ``/api/lipschitz/status`` (``api.fetchApi`` uses that one).
"""
from __future__ import annotations

import math
import re
from typing import Any

from aiohttp import web

from .progress import snapshot

PATH = "/lipschitz/status"
NODE_ID = re.compile(r"^[A-Za-z0-9:_.-]{1,64}$")


def _finite(value: Any) -> Any:
    """NaN/inf (a diverged run) are not JSON: send them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


async def status(request: web.Request) -> web.Response:
    node = request.query.get("node")
    if node is not None and not NODE_ID.fullmatch(node):
        return web.json_response({"error": "node must match ^[A-Za-z0-9:_.-]{1,64}$"}, status=400)
    return web.json_response(_finite(snapshot(node)),
                             headers={"Cache-Control": "no-store"})


def register(server: Any = None) -> bool:
    """Add the route to ComfyUI's route table (before it is frozen); once per server."""
    if server is None:
        try:
            from server import PromptServer
        except ImportError:
            return False
        server = getattr(PromptServer, "instance", None)
    if server is None or getattr(server, "_lipschitz_routes", False):
        return False
    server.routes.get(PATH)(status)
    server._lipschitz_routes = True
    return True
