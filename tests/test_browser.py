"""The pack's frontend extension in a real browser: Debian chromium driven by Playwright.

Needs /usr/bin/chromium (``make browser-deps``) and the ``playwright`` Python package; nothing
is downloaded at run time (no ``playwright install``). Screenshots and console logs go to
tests/artifacts/browser/ (git-ignored by a .gitignore written there).

The helpers (launching the browser, collecting console errors, opening the frontend, queueing
from the page, waiting for the server to be idle) are meant for more browser tests, e.g. opening
each bundled workflow from the templates browser.
"""
from __future__ import annotations

import contextlib
import random
import re
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from graphs import CKPT, RES, install_subject
from tools.comfy_server import ComfyServer, ComfyServerError

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
# Everything not served by the local ComfyUI (the frontend asks api.comfy.org about releases and
# node packs) is aborted, so that the console is the same with or without internet access.
EXTERNAL = re.compile(r"^https?://(?!(127\.0\.0\.1|localhost)(:\d+)?/)")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
EXTENSION = "lipschitz.personalize.chart"
STEPS = 5
TRAIN_NODE = "3"
# Chromium asks for /favicon.ico on some loads and not on others: not a baseline difference.
ALWAYS_ALLOWED = {"error: Failed to load resource: the server responded with a status of 404 (Not Found) [/favicon.ico]"}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium: run `make browser-deps`"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


# --------------------------------------------------------------------------------------------
# helpers


def artifact_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS


@contextlib.contextmanager
def launch_browser(headless: bool = True):
    """A chromium context with a fresh user-data dir (removed afterwards)."""
    profile = Path(tempfile.mkdtemp(prefix="lipschitz-chromium-"))
    try:
        with sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(profile), executable_path=str(CHROMIUM), headless=headless, args=CHROMIUM_ARGS,
                viewport=VIEWPORT)
            context.route(EXTERNAL, lambda route: route.abort("internetdisconnected"))
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


_PORT = re.compile(r"(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?")
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_HEX = re.compile(r"\b[0-9a-f]{16,}\b", re.I)
_LINECOL = re.compile(r":\d+:\d+\b")
_NUMBER = re.compile(r"\d{4,}")


def normalise(text: str) -> str:
    """A console message without what differs from one server/page load to the next."""
    text = _PORT.sub(r"\1://HOST", text)
    text = _UUID.sub("<uuid>", text)
    text = _HEX.sub("<hex>", text)
    text = _LINECOL.sub(":L:C", text)
    text = _NUMBER.sub("N", text)
    return " ".join(text.split())


@dataclass
class ConsoleLog:
    """Console messages and uncaught page errors of one page (attach before navigating)."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (type, text, url)

    def attach(self, page) -> "ConsoleLog":
        page.on("console", lambda m: self.entries.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.entries.append(("pageerror", str(e), "")))
        return self

    @staticmethod
    def _external(entry: tuple[str, str, str]) -> bool:
        kind, text, url = entry
        return kind == "error" and text.startswith("Failed to load resource") and bool(EXTERNAL.match(url))

    def errors(self) -> list[tuple[str, str, str]]:
        """Errors, less the failed loads of external resources (aborted by launch_browser)."""
        return [e for e in self.entries if e[0] in ("error", "pageerror") and not self._external(e)]

    def external_errors(self) -> list[tuple[str, str, str]]:
        return [e for e in self.entries if self._external(e)]

    def error_keys(self) -> set[str]:
        """Normalised error texts; a failed resource load also names the resource."""
        keys = set()
        for kind, text, url in self.errors():
            key = f"{kind}: {text}"
            if text.startswith("Failed to load resource"):
                key += f" [{urllib.parse.urlsplit(url).path}]"
            keys.add(normalise(key))
        return keys

    def save(self, path: Path) -> Path:
        path.write_text("".join(f"[{k}] {t}  ({u})\n" for k, t, u in self.entries))
        return path


def open_frontend(page, url: str, settle: float = 2.0, timeout: float = 120.0) -> None:
    """Load the ComfyUI frontend and wait until the app, its graph and canvas exist."""
    page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
    wait_for_app(page, timeout)
    with contextlib.suppress(sync_api.TimeoutError):
        page.wait_for_load_state("networkidle", timeout=30_000)
    page.wait_for_timeout(settle * 1000)  # late console errors of the start-up


def wait_for_app(page, timeout: float = 120.0) -> None:
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas "
                           "&& window.LiteGraph && window.comfyAPI && window.comfyAPI.api",
                           timeout=timeout * 1000)


def dismiss_dialogs(page, wait: float = 5.0) -> None:
    """Close what a fresh profile opens on start (the templates browser), once it is shown."""
    dialogs = page.locator(".p-dialog:visible")
    with contextlib.suppress(sync_api.TimeoutError):
        dialogs.first.wait_for(state="visible", timeout=wait * 1000)
    for _ in range(5):
        if not dialogs.count():
            return
        close = dialogs.first.locator("button:visible:has(i.pi-times), button:visible[aria-label='Close'], "
                                       "button:visible.p-dialog-close-button")
        if close.count():
            close.first.click()
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    assert not dialogs.count(), "a dialog stays open"


def wait_for_idle(client, timeout: float = 300.0) -> None:
    """Until the server has nothing running or pending."""
    deadline = time.monotonic() + timeout
    while True:
        q = client.get("/queue")
        if not q.get("queue_running") and not q.get("queue_pending"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue not idle after {timeout}s: {q}")
        time.sleep(0.5)


def queue_from_page(page, api_graph: dict, name: str = "lipschitz_browser_test") -> str:
    """Load an API-format graph into the page and queue it from there (so the websocket events
    go to this page's client id); returns the prompt id."""
    page.evaluate("([g, n]) => window.app.loadApiJson(g, n)", [api_graph, name])
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                              timeout=60_000) as resp:
        page.evaluate("() => window.app.queuePrompt(0, 1)")
    body = resp.value.json()
    assert resp.value.ok and not body.get("node_errors"), body
    return body["prompt_id"]


def wait_for_prompt(client, prompt_id: str, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        entry = client.history(prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            return entry
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s")
        time.sleep(0.5)


def center_on_node(page, node_id: str) -> None:
    """Zoom 1, the node's title near the top of the view, the mouse out of the way."""
    page.evaluate("""(id) => {
        const c = window.app.canvas, n = window.app.graph.getNodeById(id);
        c.ds.scale = 1;
        c.ds.offset[0] = -n.pos[0] + Math.max((c.canvas.clientWidth - n.size[0]) / 2, 0);
        c.ds.offset[1] = -n.pos[1] + 130;
        c.setDirty(true, true);
    }""", node_id)
    page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 10)
    page.wait_for_timeout(500)


def chart_points(page, node_id: str) -> int:
    return page.evaluate("(id) => (window.__lipschitzChart && window.__lipschitzChart[id]"
                         " && window.__lipschitzChart[id].points) || 0", node_id)


def wait_for_points(page, node_id: str, n: int, timeout: float = 60.0) -> None:
    page.wait_for_function("([id, n]) => { const c = window.__lipschitzChart && window.__lipschitzChart[id];"
                           " return !!c && c.points >= n; }", arg=[node_id, n], timeout=timeout * 1000)


def screenshot(page, name: str) -> Path:
    path = artifact_dir() / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def train_and_sample_graph(seed: int) -> dict:
    """API graph with numeric ids (as app.loadApiJson wants): train, then sample with the result."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LipschitzLoadReferenceImages", "inputs": {"folder": "dog", "resolution": RES, "crop": "center"}},
        TRAIN_NODE: {"class_type": "LipschitzPersonalize", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
            "prompt": "a photo of sks dog", "lambda_reg": 500.0, "steps": STEPS, "learning_rate": 1e-4,
            "seed": seed, "resolution": RES}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks dog on a beach"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": [TRAIN_NODE, 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "seed": 1, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "browser_chart"}},
    }


def baseline_console_errors(tmp_dir: Path) -> set[str]:
    """Normalised console errors of the stock frontend on a ComfyUI without this pack."""
    server = ComfyServer(tmp_dir, link_pack=False)
    with server, launch_browser() as context:
        page = context.new_page()
        log = ConsoleLog().attach(page)
        open_frontend(page, server.url)
        assert page.evaluate("() => !window.__lipschitzChartExtension")
        screenshot(page, "baseline_bare_frontend.png")
        print(f"console: {log.save(artifact_dir() / 'console_baseline.txt')}")
        for _, text, url in log.external_errors():
            print(f"  (external, aborted) {text} {url}")
        page.close()
    return log.error_keys() | {normalise(k) for k in ALWAYS_ALLOWED}


# --------------------------------------------------------------------------------------------
# tests


def test_status_route_is_read_only_and_validates_the_node_id(comfy_server):
    client = comfy_server.client
    assert isinstance(client.get("/lipschitz/status"), dict)
    assert client.get("/api/lipschitz/status?node=no-such-node") == {}
    for bad in ("../../etc/passwd", "a/b", "x" * 65, "", "a b"):
        with pytest.raises(ComfyServerError, match="HTTP 400"):
            client.get("/lipschitz/status?" + urllib.parse.urlencode({"node": bad}))
    with pytest.raises(ComfyServerError, match="HTTP 405"):
        client.post("/lipschitz/status", {})


def test_chart_draws_live_steps_and_refills_after_reload(comfy_server, tmp_path):
    t0 = time.monotonic()
    baseline = baseline_console_errors(tmp_path / "bare")
    print(f"baseline console errors ({time.monotonic() - t0:.0f}s):")
    for key in sorted(baseline):
        print(f"  {key}")

    install_subject(comfy_server.input_dir)
    client = comfy_server.client
    listed = client.get("/extensions")
    ours = [u for u in listed if u.endswith("/lipschitz_chart.js")]
    assert ours, listed
    print(f"extension scripts: {ours}")

    with launch_browser() as context:
        page = context.new_page()
        log = ConsoleLog().attach(page)
        status_requests: list[str] = []
        page.on("request", lambda r: "/lipschitz/status" in r.url and status_requests.append(r.url))

        # (b) the frontend with the pack: our extension is registered, no new console error
        open_frontend(page, comfy_server.url)
        names = page.evaluate("() => (window.app.extensions || []).map(e => e.name)")
        assert EXTENSION in names
        extra = log.error_keys() - baseline
        assert not extra, f"console errors beyond the bare frontend's: {sorted(extra)}"
        dismiss_dialogs(page)

        # (c) queue from the page: the chart fills from the live websocket events
        seed = random.randrange(1, 2**31)  # a new run key: never served from a finished run on disk
        prompt_id = queue_from_page(page, train_and_sample_graph(seed))
        entry = wait_for_prompt(client, prompt_id)
        assert entry["status"]["status_str"] == "success", entry["status"]
        wait_for_idle(client)
        wait_for_points(page, TRAIN_NODE, STEPS)
        chart = page.evaluate("(id) => window.__lipschitzChart[id]", TRAIN_NODE)
        assert chart["step"] == STEPS and chart["live"] >= STEPS, chart  # drawn from websocket events
        center_on_node(page, TRAIN_NODE)
        info = page.locator(".lipschitz-chart-info").first.inner_text()
        assert f"step {STEPS}/{STEPS}" in info and "it/s" in info and "ETA" in info, info
        el = page.locator(f'.lipschitz-chart[data-node="{TRAIN_NODE}"]')
        assert int(el.get_attribute("data-points")) >= STEPS
        assert el.is_visible()
        screenshot(page, "chart_after_run.png")
        server_events = client.get(f"/lipschitz/status?node={TRAIN_NODE}")[TRAIN_NODE]["events"]
        assert [e["step"] for e in server_events] == list(range(1, STEPS + 1))

        # (d) reload: no websocket event arrives any more, the chart refills from the status route
        status_requests.clear()
        page.reload(wait_until="domcontentloaded")
        wait_for_app(page)
        assert page.evaluate("() => !!window.app.graph.getNodeById(%s)" % TRAIN_NODE), \
            "the workflow was not restored after the reload"
        wait_for_points(page, TRAIN_NODE, STEPS)
        assert status_requests, "the chart did not read /lipschitz/status after the reload"
        dismiss_dialogs(page)
        center_on_node(page, TRAIN_NODE)
        chart = page.evaluate("(id) => window.__lipschitzChart[id]", TRAIN_NODE)
        assert chart["points"] >= STEPS and chart["live"] == 0, chart  # refilled, no live event
        screenshot(page, "chart_after_reload.png")

        extra = log.error_keys() - baseline
        print(f"console: {log.save(artifact_dir() / 'console_with_pack.txt')}")
        assert not extra, f"console errors beyond the bare frontend's: {sorted(extra)}"
    print(f"browser test took {time.monotonic() - t0:.0f}s")
