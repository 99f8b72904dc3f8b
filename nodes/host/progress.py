"""Progress of running personalizations: ComfyUI progress bar, node text, websocket events.

The latest events of each running node are also kept here (bounded), so the frontend's
chart can refill after a browser reload through the read-only status route.
"""
from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Any, Iterator

import comfy.model_management
import comfy.utils
from server import PromptServer

EVENT = "lipschitz.progress"
PREVIEW_EVENT = "lipschitz.preview"
HISTORY = 5000

_lock = threading.Lock()
_runs: dict[str, dict[str, Any]] = {}


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def send_text(node_id: str, message: str) -> None:
    """Show ``message`` under the node (ComfyUI's progress text), in the browser that queued the
    prompt only: ComfyUI broadcasts progress text to every connected client unless given one,
    and a run's text (prompt, losses) is nobody else's business. ``PromptServer.client_id`` is
    the queuing client's id while its prompt executes (None for a prompt queued without one:
    then every client gets it, as ComfyUI would)."""
    server = PromptServer.instance
    if server is not None:
        server.send_progress_text(message, str(node_id), server.client_id)


class NodeProgress:
    """Reports one node's training: one websocket event and one bar update per step."""

    def __init__(self, node_id: str, total: int, lam: float) -> None:
        self.node_id = str(node_id)
        self.total = total
        self.lam = lam
        self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.note: str | None = None
        """A line every step's text repeats (e.g. why the previews are off)."""
        with _lock:
            _runs[self.node_id] = {"node": self.node_id, "total": total, "lambda": lam,
                                   "state": "running", "events": deque(maxlen=HISTORY), "previews": None}

    def text(self, message: str) -> None:
        send_text(self.node_id, message)

    def step(self, metrics: Any) -> None:
        """Send one step's :class:`trainer.metrics.StepMetrics` (its fields, plus the node and
        lambda) to the chart; the bar update raises if the user interrupted."""
        event = metrics.as_dict()
        payload = {**event, "node": self.node_id, "lambda": self.lam}
        with _lock:
            _runs[self.node_id]["events"].append(payload)
        server = PromptServer.instance
        if server is not None:
            server.send_sync(EVENT, payload, server.client_id)
        self.text(f"step {event['step']}/{self.total}  denoise {event['denoise']:.4f}  "
                  f"L_lip {event['lip']:.3e}  |delta| {event['delta_norm']:.4f}  "
                  f"{event['steps_per_s']:.2f} it/s  ETA {_format_eta(event['eta_s'])}"
                  + (f"\n{self.note}" if self.note else ""))
        self.bar.update_absolute(event["step"])

    def preview(self, step: int, prompts: list[str], images: list[str], base: list[str], drift: float | None,
                drift_kind: str = "pixels") -> None:
        """Send one preview (PNG data URLs per prompt, the base's beside them, the drift and what
        it measures) to the queuing client's chart; the latest one, the base's and every drift
        value are kept for the status route, so the panel survives a reload."""
        payload = {"node": self.node_id, "step": step, "drift": drift, "drift_kind": drift_kind, "prompts": prompts,
                   "images": images, "base": base}
        with _lock:
            run = _runs[self.node_id]
            run["previews"] = {**payload, "drift": (run["previews"] or {}).get("drift", []) + [[step, drift]]}
        server = PromptServer.instance
        if server is not None:
            server.send_sync(PREVIEW_EVENT, payload, server.client_id)
        how = ("RMS pixel distance from the base's image" if drift_kind == "pixels"
               else f"{drift_kind.replace(', ', ' of ', 1)} features to the base's image")
        self.text(f"preview at step {step}/{self.total}" + ("" if drift is None else f": drift {drift:.4f} ({how})"))

    def finish(self, state: str) -> None:
        with _lock:
            if self.node_id in _runs:
                _runs[self.node_id]["state"] = state

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The node's work from here on: whatever raises in it (a Cancel while the photos are
        encoded or the base's previews sampled, not only during a step) marks the run
        :func:`stopped` for the chart, which would otherwise show it running forever."""
        try:
            yield
        except BaseException as exc:
            self.finish(stopped(exc))
            raise


def stopped(exc: BaseException) -> str:
    """The state a run ends in when ``exc`` stops it: ``interrupted`` (the UI's Cancel) or ``failed``."""
    return "interrupted" if isinstance(exc, comfy.model_management.InterruptProcessingException) else "failed"


def snapshot(node_id: str | None = None) -> dict[str, Any]:
    """Copy of the recorded progress, for the status route."""
    with _lock:
        runs = {k: {**v, "events": list(v["events"]), "previews": v["previews"] and {**v["previews"]}}
                for k, v in _runs.items()
                if node_id is None or k == node_id}
    return runs
