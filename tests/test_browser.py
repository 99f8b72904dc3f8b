"""The pack's frontend extension in a real browser: Debian chromium driven by Playwright.

Needs /usr/bin/chromium (``make browser-deps``) and the ``playwright`` Python package; nothing
is downloaded at run time (no ``playwright install``). Screenshots and console logs go to
tests/artifacts/browser/ (git-ignored by a .gitignore written there).

The helpers (launching the browser, collecting console errors, opening the frontend, queueing
from the page, waiting for the server to be idle) are shared by the tests: the live chart on a
small graph, and every bundled workflow opened from the templates browser (each must show all
its top level on one 1920x1200 screen, readable, as it opens; ``compare_lambda`` is then queued,
shrunk, from the page, and the prompt the frontend sends compared with the converter's). One
chromium and one bare-frontend baseline serve the module. ``tools/make_thumbnails.py`` makes the
workflows' thumbnails from this test's screenshots.
"""
from __future__ import annotations

import collections
import contextlib
import json
import random
import re
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from tools.graphs import CKPT, RES, install_subject
from tools.comfy_server import PACK_DIR_NAME, ComfyServer, ComfyServerError
from tools.make_tiny_encoders import ensure, stand_in
from tools.workflow_convert import convert

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
PREVIEW_EVERY = 2  # previews at steps 2 and 4, beside the base's images (step 0)
TRAIN_NODE = "3"
WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
WORKFLOW_CKPT = "v1-5-pruned-emaonly.safetensors"  # what the shipped workflows name
EVAL_DIR = Path(__file__).resolve().parent.parent / ".comfyui" / "models" / "eval"  # `make tiny-encoders`
TEMPLATE_STEPS = 3  # training steps of each fine-tune when compare_lambda is queued from the page
TEMPLATE_VIEWPORT = {"width": 1920, "height": 1200}
# What the frontend shows when a loaded graph names node types the server does not have
# (missingNodes.oss.title of frontend 1.32.9) or models it cannot find.
MISSING_TEXTS = ("This workflow has missing nodes", "the following models were not found")
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


@contextlib.contextmanager
def logged_page(context, console_file: str, viewport: dict | None = None):
    """A new page and its ConsoleLog (attached before any navigation); the log is saved under
    the artifacts, also when the test fails, and the page closed."""
    page = context.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    log = ConsoleLog().attach(page)
    try:
        yield page, log
    finally:
        print(f"console: {log.save(artifact_dir() / console_file)}")
        page.close()


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
    """Close what a fresh profile opens on start (the templates browser), once it is shown, and
    whatever else is open (topmost first)."""
    dialogs = page.locator(".p-dialog:visible")
    with contextlib.suppress(sync_api.TimeoutError):
        dialogs.first.wait_for(state="visible", timeout=wait * 1000)
    for _ in range(5):
        if not dialogs.count():
            return
        close = dialogs.last.locator("button:visible:has(i.pi-times), button:visible[aria-label='Close'], "
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
    return queue_loaded(page)


def queue_loaded(page) -> str:
    """Queue the graph the page shows (as the Run button does); returns the prompt id."""
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
    """Zoom 1, the node's title near the top of the view, the mouse out of the way (a node of
    the graph the canvas shows: the root graph, or the subgraph opened)."""
    page.evaluate("""(id) => {
        const c = window.app.canvas, n = c.graph.getNodeById(id);
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


def wait_for_previews(page, node_id: str, timeout: float = 60.0) -> None:
    """The chart of ``node_id`` shows the last preview's images beside the base's, decoded, and
    the drift curve has a point per preview (the base's 0 included)."""
    last = STEPS // PREVIEW_EVERY * PREVIEW_EVERY
    page.wait_for_function("""([id, last, n]) => {
        const c = window.__lipschitzChart && window.__lipschitzChart[id];
        if (!c || c.preview.step !== last || c.preview.drift !== n) return false;
        const root = document.querySelector(`.lipschitz-chart[data-node="${id}"]`);
        const imgs = root ? [...root.querySelectorAll(".lipschitz-preview img")] : [];
        const current = imgs.filter(i => i.dataset.kind === "current" && i.dataset.step === String(last));
        return imgs.length === 4 && current.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0);
    }""", arg=[node_id, last, last // PREVIEW_EVERY + 1], timeout=timeout * 1000)


def screenshot(page, name: str) -> Path:
    path = artifact_dir() / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def open_templates_browser(page, timeout: float = 30.0):
    """The workflow templates dialog, opened from the sidebar's Templates button (a fresh server
    opens it by itself on the first load); returns its locator."""
    dialog = page.locator(".p-dialog:visible").filter(has=page.locator("[data-testid='template-workflows-content']"))
    if not dialog.count():
        page.locator("button.templates-tab-button").click()
    dialog.wait_for(state="visible", timeout=timeout * 1000)
    return dialog


def open_pack_template(page, stem: str, n_nodes: int, timeout: float = 60.0) -> None:
    """Click our pack's section of the templates browser, then the card of ``stem``; wait until
    its graph is the active workflow."""
    dialog = open_templates_browser(page)
    dialog.get_by_text(PACK_DIR_NAME, exact=True).first.click()  # the section in the side nav
    card = dialog.locator(f"[data-testid='template-workflow-{stem}']")
    card.wait_for(state="visible", timeout=timeout * 1000)
    card.click()
    dialog.wait_for(state="hidden", timeout=timeout * 1000)
    page.wait_for_function("([stem, n]) => { const w = window.app.extensionManager.workflow.activeWorkflow;"
                           " return !!w && w.filename === stem && window.app.graph._nodes.length === n; }",
                           arg=[stem, n_nodes], timeout=timeout * 1000)


def missing_warnings(page, wait: float = 1.5) -> list[str]:
    """Lines of the page that say nodes or models are missing (the dialog comes a moment after
    the graph), and the texts of error toasts."""
    page.wait_for_timeout(wait * 1000)
    lines = [line.strip() for line in page.locator("body").inner_text().splitlines()]
    found = [line for line in lines if any(t.lower() in line.lower() for t in MISSING_TEXTS)]
    toasts = page.locator(".p-toast-message-error:visible")
    return found + [f"toast: {toasts.nth(i).inner_text()}" for i in range(toasts.count())]


# Every node of the loaded graph: the top level's, then each subgraph definition's once (the
# instances of one definition share its nodes). Shared by the page scripts below.
ALL_NODES_JS = """const allNodes = () => [...window.app.graph._nodes,
    ...[...(window.app.graph.subgraphs || new Map()).values()].flatMap(s => s._nodes || s.nodes)];"""


def graph_summary(page) -> dict:
    """Node types of the top level and inside the subgraphs, and what would stop a run: node
    types the frontend does not know, nodes with errors, combo values the server does not offer."""
    return page.evaluate("() => {" + ALL_NODES_JS + """
        const subgraphs = window.app.graph.subgraphs || new Map();
        const nodes = allNodes().filter(n => !subgraphs.has(n.type));  // instances: their inner nodes count
        return {
            types: window.app.graph._nodes.map(n => n.type),
            inner_types: [...subgraphs.values()].flatMap(s => (s._nodes || s.nodes).map(n => n.type)),
            unregistered: nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type),
            errors: nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
            // combo values the server does not offer, on nodes that run (mode 0)
            combos: nodes.filter(n => n.mode === 0).flatMap(n => (n.widgets || []).filter(w => w.type === "combo"
                && Array.isArray(w.options && w.options.values) && !w.options.values.includes(w.value))
                .map(w => `${n.id} ${n.type}.${w.name}=${w.value}`)),
        };
    }""")


def view_on_load(page) -> dict:
    """What the frontend shows of the loaded graph, as it opened it: the zoom, whether that zoom
    draws text (below ``low_quality`` the frontend draws boxes without titles or widgets), the
    part of the canvas nothing of the frontend covers (the side bar, the tab bar, the breadcrumb
    and Run bars, the minimap), and the top level's nodes (title bar included) outside it or
    on top of each other."""
    return page.evaluate("""() => {
        const c = window.app.canvas, r = c.canvas.getBoundingClientRect();
        const rect = sel => [...document.querySelectorAll(sel)].map(e => e.getBoundingClientRect())
            .filter(b => b.width > 0 && b.height > 0);
        const side = rect(".side-tool-bar-container"), tabs = rect(".workflow-tabs-container");
        const bars = [...tabs, ...rect(".p-breadcrumb"), ...rect(".actionbar-container")];
        const floating = rect(".minimap-main-container");
        const view = {left: Math.max(r.left, ...side.map(b => b.right)), top: Math.max(r.top, ...bars.map(b => b.bottom)),
                      right: r.right, bottom: r.bottom};
        const [sx, sy] = c.ds.offset, s = c.ds.scale;
        const boxes = c.graph._nodes.map(n => { const b = n.getBounding();
            return {id: n.id, title: n.title, left: (b[0] + sx) * s + r.left, top: (b[1] + sy) * s + r.top,
                    right: (b[0] + b[2] + sx) * s + r.left, bottom: (b[1] + b[3] + sy) * s + r.top}; });
        const meets = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
        return {
            scale: s, low_quality: c.low_quality, nodes: boxes.length, view, found: {side: side.length, tabs: tabs.length},
            outside: boxes.filter(b => b.left < view.left || b.top < view.top || b.right > view.right
                || b.bottom > view.bottom || floating.some(f => meets(b, f)))
                .map(b => `${b.id} ${b.title} [${[b.left, b.top, b.right, b.bottom].map(Math.round)}]`),
            overlapping: boxes.flatMap((a, i) => boxes.slice(i + 1).filter(b => meets(a, b))
                .map(b => `${a.id} ${a.title} / ${b.id} ${b.title}`)),
        };
    }""")


def fit_view(page) -> None:
    """The whole graph in the view, with titles and widgets drawn at any zoom."""
    page.evaluate("() => { window.app.canvas.min_font_size_for_lod = 0; }")  # this page only
    page.get_by_role("button", name="Fit View").click()
    page.mouse.move(page.viewport_size["width"] // 2, page.viewport_size["height"] - 10)
    page.wait_for_timeout(500)


def train_and_sample_graph(seed: int) -> dict:
    """API graph with numeric ids (as app.loadApiJson wants): train, then sample with the result."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LipschitzLoadReferenceImages", "inputs": {"folder": "dog", "resolution": RES, "crop": "center"}},
        TRAIN_NODE: {"class_type": "LipschitzPersonalize", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
            "prompt": "a photo of sks dog", "lambda_reg": 500.0, "steps": STEPS, "learning_rate": 1e-4,
            "seed": seed, "resolution": RES, "preview_every": PREVIEW_EVERY, "preview_steps": 1, "preview_size": RES}},
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
    assert client.get("/lipschitz/status?node=50:43") == {}  # a node inside subgraph instance 50
    for bad in ("../../etc/passwd", "a/b", "x" * 65, "", "a b"):
        with pytest.raises(ComfyServerError, match="HTTP 400"):
            client.get("/lipschitz/status?" + urllib.parse.urlencode({"node": bad}))
    with pytest.raises(ComfyServerError, match="HTTP 405"):
        client.post("/lipschitz/status", {})


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> set[str]:
    """The stock frontend's console errors, measured once for the module (before ``browser``)."""
    t0 = time.monotonic()
    keys = baseline_console_errors(tmp_path_factory.mktemp("bare"))
    print(f"baseline console errors ({time.monotonic() - t0:.0f}s):")
    for key in sorted(keys):
        print(f"  {key}")
    return keys


@pytest.fixture(scope="module")
def browser(baseline):
    """One chromium context for the module's tests (each test opens and closes its pages)."""
    with launch_browser() as context:
        yield context


def test_chart_draws_live_steps_and_refills_after_reload(comfy_server, baseline, browser):
    t0 = time.monotonic()
    install_subject(comfy_server.input_dir)
    client = comfy_server.client
    listed = client.get("/extensions")
    ours = [u for u in listed if u.endswith("/lipschitz_chart.js")]
    assert ours, listed
    print(f"extension scripts: {ours}")

    with logged_page(browser, "console_with_pack.txt") as (page, log):
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
        wait_for_previews(page, TRAIN_NODE)
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
        wait_for_previews(page, TRAIN_NODE)  # the images and the drift curve came back too
        screenshot(page, "chart_after_reload.png")

        extra = log.error_keys() - baseline
        assert not extra, f"console errors beyond the bare frontend's: {sorted(extra)}"
    print(f"browser test took {time.monotonic() - t0:.0f}s")


def _shrink_and_reseed(page, seed: int) -> dict:
    """Make the loaded compare_lambda cheap through its widgets (as a user would edit them, inside
    its subgraph too): few training steps at 64 px, a new training seed (a new run key, so no
    finished run is reloaded from disk), 64 px latents, one sampling step, and ``seed`` as the
    evaluation seed. Returns {node type: nodes changed}."""
    return page.evaluate("([seed, steps]) => {" + ALL_NODES_JS + """
        const changed = {};
        const set = (n, name, v) => {
            const w = (n.widgets || []).find(w => w.name === name);
            if (!w) throw new Error(`${n.type} ${n.id} has no widget ${name}`);
            w.value = v;
        };
        for (const n of allNodes()) {  // the samplers inside the subgraphs too
            if (n.type === "LipschitzPersonalize") {
                set(n, "steps", steps); set(n, "resolution", 64); set(n, "learning_rate", 1e-4); set(n, "seed", seed);
            } else if (n.type === "LipschitzLoadReferenceImages") {
                set(n, "resolution", 64);
            } else if (n.type === "EmptyLatentImage") {
                set(n, "width", 64); set(n, "height", 64);
            } else if (n.type === "KSampler") {
                set(n, "steps", 1);
            } else if (n.type === "PrimitiveInt" && n.title === "evaluation seed") {
                set(n, "value", seed);
            } else continue;
            changed[n.type] = (changed[n.type] || 0) + 1;
        }
        window.app.graph.setDirtyCanvas(true, true);
        return changed;
    }""", [seed, TEMPLATE_STEPS])


def _inner_types(workflow: dict) -> list[str]:
    """Node types inside a workflow's subgraph definitions (each definition once)."""
    return [n["type"] for sg in (workflow.get("definitions") or {}).get("subgraphs") or [] for n in sg["nodes"]]


def _wiring(prompt: dict) -> dict:
    """An API prompt without its literal values: each node's type and where its links come from."""
    return {nid: (n["class_type"], {k: v for k, v in n["inputs"].items() if isinstance(v, list)})
            for nid, n in prompt.items()}


def _beyond(log: ConsoleLog, baseline: set[str]) -> set[str]:
    """Console errors beyond the bare frontend's, less the refused thumbnails (the 404s above)."""
    return {k for k in log.error_keys() - baseline
            if not re.search(rf"404 .*\[/(api/)?workflow_templates/{PACK_DIR_NAME}/[^/]+\.jpg\]$", k)}


def test_bundled_workflows_open_from_the_templates_browser_and_compare_lambda_runs(
        comfy_server, tiny_ckpt, baseline, browser):
    t0 = time.monotonic()
    client = comfy_server.client
    # What the shipped workflows need on the server: their checkpoint name (the tiny one under it)
    # and the reference photos in input/dog. Before the page loads: the combos come with it.
    link = comfy_server.checkpoints_dir / WORKFLOW_CKPT
    if not link.exists():
        link.symlink_to(tiny_ckpt)
    stand_in(comfy_server.base_dir / "models" / "eval", ensure(EVAL_DIR))  # the metric nodes' encoders
    install_subject(comfy_server.input_dir)
    workflows = {p.stem: json.loads(p.read_text()) for p in WORKFLOWS}
    assert sorted(client.get("/workflow_templates")[PACK_DIR_NAME]) == sorted(workflows)
    assert [n["type"] for n in workflows["compare_lambda"]["nodes"]].count("LipschitzPersonalize") == 4

    with logged_page(browser, "console_templates.txt", TEMPLATE_VIEWPORT) as (page, log):
        template_requests: list[tuple[str, int]] = []
        page.on("response", lambda r: f"/workflow_templates/{PACK_DIR_NAME}/" in r.url
                and template_requests.append((urllib.parse.urlsplit(r.url).path, r.status)))
        # Newer ComfyUI serves only .json from a pack's workflow folder: the shipped .jpg
        # thumbnails are answered 404 here too, and nothing below may depend on them.
        page.route(re.compile(rf"/workflow_templates/{PACK_DIR_NAME}/[^/]+\.jpg$"),
                   lambda route: route.fulfill(status=404, body="not served"))
        open_frontend(page, comfy_server.url)

        # The missing-node check sees the frontend's dialog: a graph with an unknown node type.
        bogus = json.loads(json.dumps(workflows["drift_check"]))
        bogus["nodes"][1]["type"] = "LipschitzNoSuchNode"
        page.evaluate("(g) => window.app.loadGraphData(g, true, true, 'missing_node_probe')", bogus)
        seen = missing_warnings(page)
        assert any(MISSING_TEXTS[0] in line for line in seen), seen
        dismiss_dialogs(page)

        # Every bundled workflow, opened by clicking its card in our section of the templates
        # browser (compare_lambda last: it stays loaded and is queued below).
        order = sorted(workflows, key=lambda stem: (stem == "compare_lambda", stem))
        for stem in order:
            wf = workflows[stem]
            open_pack_template(page, stem, len(wf["nodes"]))
            warnings = missing_warnings(page)
            assert not warnings, f"{stem}: {warnings}"
            assert not page.locator(".p-dialog:visible").count(), f"{stem}: a dialog opened on load"
            graph = graph_summary(page)
            assert collections.Counter(graph["types"]) == collections.Counter(n["type"] for n in wf["nodes"]), stem
            assert collections.Counter(graph["inner_types"]) == collections.Counter(_inner_types(wf)), stem
            assert not graph["unregistered"] and not graph["errors"], (stem, graph)
            assert not graph["combos"], f"{stem}: combo values the server does not offer: {graph['combos']}"
            # Read at a glance: as opened, the whole top level is on this screen, at a zoom that
            # draws titles and widgets, no node on another.
            view = view_on_load(page)
            print(f"{stem} opens at {view['scale']:.2f}: {view['nodes']} nodes in {view['view']}")
            assert view["found"]["side"] and view["found"]["tabs"], view  # the frontend's layout as measured
            assert not view["low_quality"], f"{stem} opens at zoom {view['scale']}: the frontend draws no text"
            assert not view["outside"], f"{stem}: nodes off the screen as opened: {view['outside']}"
            assert not view["overlapping"], f"{stem}: nodes on top of each other: {view['overlapping']}"
            fit_view(page)
            screenshot(page, f"template_{stem}.png")
            extra = _beyond(log, baseline)
            assert not extra, f"{stem}: console errors beyond the bare frontend's: {sorted(extra)}"
        opened = {path.rsplit("/", 1)[-1] for path, status in template_requests if status == 200}
        assert {f"{stem}.json" for stem in workflows} <= opened, template_requests
        print(f"templates opened ({time.monotonic() - t0:.0f}s): {order}")

        # compare_lambda, shrunk through its widgets and queued from the page.
        seed = random.randrange(1, 2**31)
        changed = _shrink_and_reseed(page, seed)
        kinds = ("LipschitzPersonalize", "LipschitzLoadReferenceImages", "EmptyLatentImage", "KSampler", "PrimitiveInt")
        folded = workflows["compare_lambda"]
        shipped = collections.Counter(t for t in [n["type"] for n in folded["nodes"]] + _inner_types(folded) if t in kinds)
        assert changed == dict(shipped), changed  # every node of those kinds was shrunk
        posted: list[dict] = []
        page.on("request", lambda r: r.url.endswith("/prompt") and r.method == "POST" and posted.append(r.post_data_json))
        t_run = time.monotonic()
        prompt_id = queue_loaded(page)
        # The frontend flattened the subgraphs as tools/workflow_convert.py does (the tests run
        # the shipped files through it): the same node ids, types and links. And the one
        # evaluation seed reached every sampler, inside the subgraph instances too.
        (sent,) = [body["prompt"] for body in posted]
        expected = convert(folded, client.object_info())
        assert _wiring(sent) == _wiring(expected)
        (seed_id,) = [nid for nid, n in sent.items() if n["_meta"]["title"] == "evaluation seed"]
        seeds = {nid: n["inputs"]["seed"] for nid, n in sent.items() if n["class_type"] == "KSampler"}
        assert len(seeds) == 4 * 4 + 1 and all(s == [seed_id, 0] for s in seeds.values()), seeds  # 4 per model, the base's drift
        assert sent[seed_id]["inputs"]["value"] == seed, sent[seed_id]
        entry = wait_for_prompt(client, prompt_id)
        assert entry["status"]["status_str"] == "success", entry["status"]
        wait_for_idle(client)
        print(f"compare_lambda ran in {time.monotonic() - t_run:.0f}s")

        # Every fine-tune's chart drew its steps from this page's websocket events.
        train_ids = page.evaluate("() => window.app.graph._nodes.filter(n => n.type === 'LipschitzPersonalize')"
                                  ".map(n => String(n.id))")
        assert len(train_ids) == 4, train_ids
        for nid in train_ids:
            wait_for_points(page, nid, TEMPLATE_STEPS)
            chart = page.evaluate("(id) => window.__lipschitzChart[id]", nid)
            assert chart["step"] == TEMPLATE_STEPS and chart["live"] >= TEMPLATE_STEPS, (nid, chart)

        # The grid: written to the output folder and shown on its SaveImage node.
        grid_save = page.evaluate("""() => {
            const g = window.app.graph;
            const save = g._nodes.find(n => n.type === "SaveImage" && (n.inputs || []).some(i =>
                i.link != null && g.getNodeById(g.links[i.link].origin_id).type === "LipschitzLabeledGrid"));
            return save ? {id: String(save.id), prefix: save.widgets.find(w => w.name === "filename_prefix").value} : null;
        }""")
        assert grid_save, "no SaveImage fed by the LipschitzLabeledGrid"
        images = (entry["outputs"].get(grid_save["id"]) or {}).get("images") or []
        assert len(images) == 1, entry["outputs"]
        img = images[0]
        prefix = Path(grid_save["prefix"])
        assert img["subfolder"] == str(prefix.parent) and img["filename"].startswith(prefix.name), (img, prefix)
        grid_file = comfy_server.output_dir / img["subfolder"] / img["filename"]
        assert grid_file.is_file(), grid_file
        page.wait_for_function("""([id, name]) => {
            const n = window.app.graph.getNodeById(id);
            const onNode = (n.imgs || []).some(i => i.src.includes(encodeURIComponent(name)) && i.complete && i.naturalWidth > 0);
            const inDom = [...document.querySelectorAll("img")].some(i => i.src.includes("/view?")
                && i.src.includes(encodeURIComponent(name)) && i.complete && i.naturalWidth > 0);
            return onNode || inDom;
        }""", arg=[grid_save["id"], img["filename"]], timeout=30_000)
        shown = page.evaluate("""([id, name]) => {
            const n = window.app.graph.getNodeById(id);
            const mine = i => i.src.includes(encodeURIComponent(name));
            const onNode = (n.imgs || []).find(mine);
            const i = onNode || [...document.querySelectorAll("img")].find(mine);
            return {src: i.src, w: i.naturalWidth, h: i.naturalHeight, where: onNode ? "node.imgs" : "<img>"};
        }""", [grid_save["id"], img["filename"]])
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(shown["src"]).query)
        assert query["type"] == ["output"] and query["subfolder"] == [img["subfolder"]], shown
        with Image.open(grid_file) as im:
            assert (shown["w"], shown["h"]) == im.size, (shown, im.size)
        print(f"grid: {grid_file} {shown['w']}x{shown['h']}, shown ({shown['where']}) from {shown['src']}")

        center_on_node(page, grid_save["id"])
        screenshot(page, "compare_lambda_grid.png")
        center_on_node(page, train_ids[0])
        screenshot(page, "compare_lambda_charts.png")

        extra = _beyond(log, baseline)
        assert not extra, f"console errors beyond the bare frontend's: {sorted(extra)}"
    print(f"templates test took {time.monotonic() - t0:.0f}s")


def _to_subgraph(page, node_id: str) -> str:
    """Convert the node into a subgraph (as "Convert to Subgraph" does); the instance's id."""
    return page.evaluate("""(id) => {
        const g = window.app.graph;
        const { node } = g.convertToSubgraph(new Set([g.getNodeById(id)]));
        g.setDirtyCanvas(true, true);
        return String(node.id);
    }""", node_id)


def _second_instance(page, first: str, consumer: str, node_id: str, seed: int) -> str:
    """A second instance of ``first``'s subgraph, wired like it and feeding ``consumer``'s model
    input instead of it, with a new seed on the inner node (a new run); the new instance's id."""
    return page.evaluate("""([first, consumer, id, seed]) => {
        const g = window.app.graph, one = g.getNodeById(first);
        const two = window.LiteGraph.createNode(one.type);
        g.add(two);
        one.inputs.forEach((input, i) => {
            if (input.link == null) return;
            const link = g.links.get ? g.links.get(input.link) : g.links[input.link];
            g.getNodeById(link.origin_id).connect(link.origin_slot, two, i);
        });
        two.connect(0, g.getNodeById(consumer), 0);
        one.subgraph.getNodeById(id).widgets.find(w => w.name === "seed").value = seed;
        g.setDirtyCanvas(true, true);
        return String(two.id);
    }""", [first, consumer, node_id, seed])


def _inner_chart(page, instance: str, node_id: str) -> str:
    """The execution id the inner node's chart draws (its element's data-node)."""
    return page.evaluate("""([inst, id]) => window.app.graph.getNodeById(inst).subgraph.getNodeById(id)
        .widgets.find(w => w.name === "lipschitz_chart").element.dataset.node""", [instance, node_id])


def test_a_node_inside_a_subgraph_gets_its_chart_and_other_browsers_get_nothing(comfy_server, baseline, browser):
    """Inside a subgraph the server names the node "<instance>:<id>": the chart resolves that id
    (and a second instance's later run takes over the shared inner node's chart), a root node
    with the inner node's plain id draws nothing, and a second browser on the same server gets
    neither the progress events nor the node texts of a prompt it did not queue."""
    client = comfy_server.client
    install_subject(comfy_server.input_dir)
    with logged_page(browser, "console_subgraph.txt") as (page, log), \
            logged_page(browser, "console_bystander.txt") as (other, _):
        open_frontend(other, comfy_server.url)
        other.evaluate("""() => { const api = window.comfyAPI.api.api; window.__heard = {text: 0, progress: 0, preview: 0};
            api.addEventListener("progress_text", () => window.__heard.text++);
            api.addEventListener("lipschitz.progress", () => window.__heard.progress++);
            api.addEventListener("lipschitz.preview", () => window.__heard.preview++); }""")
        open_frontend(page, comfy_server.url)
        dismiss_dialogs(page)
        page.evaluate("([g, n]) => window.app.loadApiJson(g, n)",
                      [train_and_sample_graph(random.randrange(1, 2**31)), "lipschitz_subgraph_test"])
        first = _to_subgraph(page, TRAIN_NODE)
        # A muted Personalize node of the root graph that takes the inner node's plain id.
        decoy = page.evaluate("""(id) => {
            const n = window.LiteGraph.createNode("LipschitzPersonalize");
            n.id = Number(id); n.mode = 2;
            window.app.graph.add(n); return String(n.id);
        }""", TRAIN_NODE)
        assert decoy == TRAIN_NODE

        entry = wait_for_prompt(client, queue_loaded(page))
        assert entry["status"]["status_str"] == "success", entry["status"]
        wait_for_idle(client)
        run_id = f"{first}:{TRAIN_NODE}"
        assert [e["step"] for e in client.get(f"/lipschitz/status?node={run_id}")[run_id]["events"]] == \
            list(range(1, STEPS + 1))
        wait_for_points(page, run_id, STEPS)
        chart = page.evaluate("(id) => window.__lipschitzChart[id]", run_id)
        assert chart["step"] == STEPS and chart["live"] >= STEPS, chart
        assert _inner_chart(page, first, TRAIN_NODE) == run_id
        # The root node draws the server's run of its own id (an earlier test's, or none), never this one.
        own = client.get(f"/lipschitz/status?node={TRAIN_NODE}").get(TRAIN_NODE, {}).get("events", [])
        decoy_chart = page.evaluate("(id) => window.__lipschitzChart[id]", TRAIN_NODE)
        assert decoy_chart["live"] == 0 and decoy_chart["points"] == len(own), \
            f"the root node drew the subgraph node's run: {decoy_chart}"
        page.evaluate("(id) => { const c = window.app.canvas, n = window.app.graph.getNodeById(id);"
                      " c.openSubgraph(n.subgraph, n); }", first)
        center_on_node(page, TRAIN_NODE)  # inside the subgraph now
        screenshot(page, "chart_inside_subgraph.png")
        page.evaluate("() => window.app.canvas.setGraph(window.app.graph)")

        second = _second_instance(page, first, "7", TRAIN_NODE, random.randrange(1, 2**31))
        entry = wait_for_prompt(client, queue_loaded(page))
        assert entry["status"]["status_str"] == "success", entry["status"]
        wait_for_idle(client)
        wait_for_points(page, f"{second}:{TRAIN_NODE}", STEPS)
        assert _inner_chart(page, first, TRAIN_NODE) == f"{second}:{TRAIN_NODE}"

        other.wait_for_timeout(500)
        assert other.evaluate("() => window.__heard") == {"text": 0, "progress": 0, "preview": 0}
        extra = log.error_keys() - baseline
        assert not extra, f"console errors beyond the bare frontend's: {sorted(extra)}"
