"""Helpers of the reliability tests (imported by tests/test_reliability_*.py, not by ComfyUI).

A dedicated ComfyUI server with the fault pack linked in, measurements of the server process
(training threads, resident memory) and the base U-Net hash. (The nodes' progress texts go to
the queuing client only: ``ComfyClient.run`` collects them, ``RunResult.texts_for``.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors import safe_open

from tools.comfy_server import ComfyServer, ComfyServerError

from . import TRAIN_THREAD, unet_hash

FAULT_PACK = Path(__file__).resolve().parent
FAULT_PACK_LINK = "lipschitz_test_fault_pack"
UNET_PREFIX = "model.diffusion_model."


def make_server(base: Path, tiny_ckpt: Path, extra_ckpts: tuple[Path, ...] = ()) -> ComfyServer:
    """A (not yet started) server with the tiny checkpoint(s) and the fault pack linked in."""
    server = ComfyServer(base)
    for ckpt in (tiny_ckpt, *extra_ckpts):
        link = server.checkpoints_dir / ckpt.name
        if not link.exists():
            link.symlink_to(ckpt)
    link = server.custom_nodes_dir / FAULT_PACK_LINK
    if not link.exists():
        link.symlink_to(FAULT_PACK, target_is_directory=True)
    return server


def file_unet_hash(ckpt: Path) -> str:
    """The hash ``LipschitzTestUNetHash`` reports for a model loaded from ``ckpt``."""
    with safe_open(str(ckpt), framework="pt") as f:
        return unet_hash((k[len(UNET_PREFIX):], f.get_tensor(k)) for k in f.keys() if k.startswith(UNET_PREFIX))


def server_unet_hash(client, ckpt_name: str) -> str:
    """Hash of the base MODEL's U-Net as the server holds it now (through the fault pack)."""
    return check_prompt(client, ckpt_name)["hash"]


def check_prompt(client, ckpt_name: str) -> dict:
    """One prompt after a run: the base U-Net hash, live Python threads and resident memory.

    Its success is also the proof that the server takes the next prompt.
    """
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
             "hash": {"class_type": "LipschitzTestUNetHash", "inputs": {"model": ["ckpt", 0]}},
             "proc": {"class_type": "LipschitzTestProcess", "inputs": {}}}
    result = client.run(graph, timeout=300)
    assert result.status == "success", result.error
    return {"hash": result.outputs["hash"]["text"][0], **process_info(result.outputs["proc"]["text"])}


def process_info(text: list[str]) -> dict:
    """``LipschitzTestProcess`` output -> ``{"rss": bytes, "threads": [names]}``."""
    return {"rss": int(text[0].split("=", 1)[1]), "threads": list(text[1:])}


# -- the server process -------------------------------------------------------------------
def thread_names(pid: int) -> list[str]:
    names = []
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:  # the thread ended while we looked
            pass
    return names


def training_threads(pid: int, settle_s: float = 2.0) -> list[str]:
    """Training threads still alive after up to ``settle_s`` seconds."""
    deadline = time.monotonic() + settle_s
    while True:
        alive = [n for n in thread_names(pid) if n.startswith(TRAIN_THREAD[:15])]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def run_expect_error(client, graph: dict, timeout: float = 300) -> tuple[str, str, object]:
    """Queue ``graph`` expecting it to fail: ``(where, message, result)``.

    ``where`` is ``"rejected"`` when ComfyUI's own validation refused it at ``POST /prompt``
    (nothing ran), ``"error"`` when a node raised; ``"success"``/``"interrupted"`` otherwise.
    """
    try:
        result = client.run(graph, timeout=timeout)
    except ComfyServerError as exc:
        return "rejected", str(exc), None
    if result.status != "error":
        return result.status, "", result
    err = result.error or {}
    return "error", f"{err.get('exception_type', '')}: {err.get('exception_message', '')}", result


def node_errors_text(message: str) -> str:
    """The node error details of a rejected prompt, flattened for assertions."""
    start = message.find("{")
    try:
        body = json.loads(message[start:])
    except ValueError:
        return message
    return json.dumps(body.get("node_errors", body))
