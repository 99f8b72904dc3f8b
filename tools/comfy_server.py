"""Start a real ComfyUI server with this pack linked in, and talk to it over HTTP + websocket.

Used by the tests (tests/conftest.py) and by ``make demo``. Dependencies: stdlib +
``websocket-client``.

    with ComfyServer(tmp_dir) as server:
        result = server.client.run(prompt, timeout=300)
        assert result.status == "success"
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_comfyui import comfyui_root  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui_lipschitz_personalize"
READY_NODE = "CheckpointLoaderSimple"
TEXT_EVENT = 3  # protocol.BinaryEventTypes.TEXT: a node's progress text, sent as a binary frame


class ComfyServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# client


@dataclass
class RunResult:
    prompt_id: str
    messages: list = field(default_factory=list)   # every websocket JSON message, in order
    history: dict = field(default_factory=dict)    # GET /history/<id>[<id>] ({} if absent)
    status: str = "success"                        # 'success' | 'error' | 'interrupted'
    error: dict | None = None                      # data of execution_error / _interrupted
    outputs: dict = field(default_factory=dict)    # node_id -> output dict (from history)
    cached_nodes: list = field(default_factory=list)  # from execution_cached
    texts: list = field(default_factory=list)      # (node id, text) of each progress-text frame

    def events(self, type_: str) -> list[dict]:
        """The ``data`` of every message of the given type (custom types included)."""
        return [m.get("data") for m in self.messages if m.get("type") == type_]

    def texts_for(self, node_id: str) -> list[str]:
        """The progress texts shown under ``node_id`` during the run, in order."""
        return [text for node, text in self.texts if node == node_id]


def progress_text(frame: bytes) -> tuple[str, str] | None:
    """``(node id, text)`` of a progress-text frame (``send_progress_text``), else None."""
    if len(frame) < 8 or struct.unpack(">I", frame[:4])[0] != TEXT_EVENT:
        return None
    n = struct.unpack(">I", frame[4:8])[0]
    return frame[8:8 + n].decode(), frame[8 + n:].decode(errors="replace")


class ComfyClient:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- plain HTTP -----------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + "/" + path.lstrip("/"), data=data,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyServerError(f"{method} {path} -> HTTP {e.code}: {detail[:4000]}") from None
        if "json" in ctype:
            return json.loads(raw or b"null")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return raw

    def get(self, path: str, timeout: float | None = None):
        """GET ``path``; decoded JSON, else raw bytes. Raises ComfyServerError on HTTP errors."""
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, json: Any = None, timeout: float | None = None):  # noqa: A002
        return self._request("POST", path, body=json if json is not None else {}, timeout=timeout)

    def object_info(self, node: str | None = None) -> dict:
        if node is None:
            return self.get("/object_info")
        return self.get(f"/object_info/{urllib.parse.quote(node)}")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        body = {"prompt": prompt, "client_id": client_id or self.client_id}
        resp = self.post("/prompt", body)
        if resp.get("node_errors"):
            raise ComfyServerError(f"prompt rejected: {json.dumps(resp)[:4000]}")
        return resp["prompt_id"]

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def history(self, prompt_id: str) -> dict:
        return self.get(f"/history/{prompt_id}").get(prompt_id, {})

    def ws_url(self, client_id: str | None = None) -> str:
        base = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        return f"{base}/ws?clientId={client_id or self.client_id}"

    # -- queue + wait over websocket ----------------------------------------------------------
    def run(self, prompt: dict, timeout: float = 600.0, on_message=None) -> RunResult:
        """Queue ``prompt`` and wait for it to finish; never raises on a failed run (see status).

        The websocket is opened before the prompt is posted so no message is missed. Stops on
        ``executing`` with ``node is None`` for this prompt id, then reads ``/history``.
        ``on_message(msg)`` is called for every JSON message (e.g. to interrupt mid-run) and for
        every progress text, as ``{"type": "progress_text", "data": {"node", "text"}}``. The
        nodes' progress texts (binary frames, sent to the queuing client only) are collected in
        ``RunResult.texts``; preview images are skipped.
        """
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(self.ws_url(client_id), timeout=10)
        messages: list[dict] = []
        texts: list[tuple[str, str]] = []
        status, error = "success", None
        deadline = time.monotonic() + timeout
        try:
            prompt_id = self.queue(prompt, client_id=client_id)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; "
                                       f"last messages: {messages[-5:]}")
                ws.settimeout(min(remaining, 5.0))
                try:
                    frame = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if isinstance(frame, bytes):  # progress text, or a preview image
                    text = progress_text(frame)
                    if text is not None:
                        texts.append(text)
                        if on_message is not None:
                            on_message({"type": "progress_text", "data": {"node": text[0], "text": text[1]}})
                    continue
                try:
                    msg = json.loads(frame)
                except ValueError:
                    continue
                messages.append(msg)
                if on_message is not None:
                    on_message(msg)
                mtype, data = msg.get("type"), msg.get("data") or {}
                if isinstance(data, dict) and data.get("prompt_id") not in (None, prompt_id):
                    continue
                if mtype == "execution_error":
                    status, error = "error", data
                elif mtype == "execution_interrupted":
                    status, error = "interrupted", data
                elif (mtype == "executing" and data.get("node") is None
                      and data.get("prompt_id") == prompt_id):
                    break
        finally:
            ws.close()

        history = {}
        for _ in range(50):  # history is written right before the final executing message
            history = self.history(prompt_id)
            if history:
                break
            time.sleep(0.1)
        st = (history.get("status") or {}).get("status_str")
        if status == "success" and st == "error":
            status = "error"
        cached: list = []
        for m in messages:
            d = m.get("data") or {}
            if m.get("type") == "execution_cached" and d.get("prompt_id") == prompt_id:
                cached.extend(d.get("nodes") or [])
        return RunResult(prompt_id=prompt_id, messages=messages, history=history, status=status,
                         error=error, outputs=history.get("outputs") or {}, cached_nodes=cached,
                         texts=texts)

    def output_images(self, result: RunResult, output_dir: str | Path | None = None) -> list[Path]:
        """Paths of the images in ``result.outputs`` (type 'output'), under ``output_dir``.

        ``output_dir`` defaults to the attached server's output folder (``ComfyServer.client``
        sets it); files are fetched through ``/view`` into a temp dir if there is none.
        """
        output_dir = Path(output_dir) if output_dir else getattr(self, "output_dir", None)
        paths: list[Path] = []
        for node_out in result.outputs.values():
            for img in node_out.get("images") or []:
                if img.get("type", "output") != "output":
                    continue
                sub = img.get("subfolder") or ""
                if output_dir is not None:
                    paths.append(Path(output_dir) / sub / img["filename"])
                else:
                    import tempfile
                    q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": sub,
                                                "type": "output"})
                    data = self.get(f"/view?{q}")
                    dest = Path(tempfile.mkdtemp(prefix="comfy-view-")) / img["filename"]
                    dest.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
                    paths.append(dest)
        return paths


# --------------------------------------------------------------------------------------------
# server


class ComfyServer:
    """A ``main.py`` ComfyUI server in ``base_dir`` with this repo linked in as a pack.

    ``cpu=True`` (tests) passes ``--cpu``; ``cpu=False`` lets ComfyUI use the GPU (the demo on
    a real checkpoint).
    """

    def __init__(self, base_dir: str | Path, port: int | None = None,
                 extra_args: Iterable[str] = (), start_timeout: float = 180.0,
                 python: str | None = None, env: dict | None = None, link_pack: bool = True,
                 cpu: bool = True):
        self.cpu = cpu
        self.link_pack = link_pack  # False: a stock ComfyUI (e.g. a baseline for the browser test)
        self.base_dir = Path(base_dir).resolve()
        self.port = port
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.python = python or sys.executable
        self.env = env
        self.root = comfyui_root()
        self.proc: subprocess.Popen | None = None
        self.client: ComfyClient | None = None
        self.log_path = self.base_dir / "server.log"
        self._log = None
        self.startup_seconds: float | None = None
        self._prepare_dirs()

    # folders
    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def checkpoints_dir(self) -> Path:
        return self.base_dir / "models" / "checkpoints"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_dirs(self) -> None:
        for d in (self.custom_nodes_dir, self.checkpoints_dir, self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self.link_pack:
            return
        link = self.custom_nodes_dir / PACK_DIR_NAME
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == REPO_ROOT:
                return
            if link.is_symlink():
                link.unlink()
            else:
                raise ComfyServerError(f"{link} exists and is not a symlink")
        link.symlink_to(REPO_ROOT, target_is_directory=True)

    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except FileNotFoundError:
            return ""

    def start(self) -> "ComfyServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.port is None:
            self.port = free_port()
        cmd = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {' '.join(cmd)}\n".encode())
        self._log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.client = ComfyClient(self.url)
        self.client.output_dir = self.output_dir
        self._wait_ready(t0)
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.start_timeout
        probe = ComfyClient(self.url, timeout=5)
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self._close_log()
                raise ComfyServerError(f"ComfyUI exited with code {rc} during start-up; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            try:
                probe.get(f"/object_info/{READY_NODE}")
                return
            except (ComfyServerError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyServerError(f"ComfyUI not ready after {self.start_timeout:.0f}s; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=timeout)
        self._close_log()

    def restart(self) -> "ComfyServer":
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
