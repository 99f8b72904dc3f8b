// Live training chart for the LipschitzPersonalize node (ComfyUI frontend extension).
//
// Each LipschitzPersonalize node gets a DOM widget with a canvas that plots, per training step,
// the denoise loss, L_lip and ||delta|| (one panel each, own y-range), plus a text line with
// steps/s and the ETA. Data arrive live over the websocket (custom event "lipschitz.progress",
// sent by nodes/host/progress.py to the client that queued the prompt). After a browser reload, or a
// websocket reconnect, the chart refills from the read-only route GET /lipschitz/status.
// Previews (event "lipschitz.preview", every preview_every steps): the latest images of the preview
// prompts beside the base model's images of the same prompts and seeds, under the chart, and the
// drift (RMS pixel distance of the token-less prompts' images from the base's, or 1 - the cosine of
// their features when an evaluation encoder is connected: the event's drift_kind) as a fourth panel.
//
// Events and the status route name a node by its execution id: its plain id for a node of the
// root graph, "<instance id>:...:<node id>" for a node inside subgraph instances. A chart shows
// the run of one of its node's execution ids, the most recently updated one (a subgraph used
// twice has one inner node and two execution ids); a root node never shows an inner node's run.
//
// Debug / test hook: window.__lipschitzChart[executionId] = {points, step, total, state, live,
// preview: {step, images, drift}} (points: drawn per step series; live: websocket events this page
// received for that id; preview: the step of the images shown, how many, drift points drawn); the
// widget's root element also carries data-points / data-node (the execution id drawn).
// No external libraries: plain canvas 2D.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "lipschitz.personalize.chart";
const NODE_CLASS = "LipschitzPersonalize";
const EVENT = "lipschitz.progress";
const PREVIEW_EVENT = "lipschitz.preview";
const STATUS_ROUTE = "/lipschitz/status";
const MAX_POINTS = 5000; // same bound as the server's history (nodes/progress.py HISTORY)
const SERIES = [
  { key: "denoise", label: "denoise loss", color: "#4fc3f7" },
  { key: "lip", label: "L_lip", color: "#ffb74d" },
  { key: "delta_norm", label: "||delta||", color: "#81c784" },
  { key: "drift", label: "drift", color: "#e57373", preview: true }, // labelled with its kind (pixels or features)
];
const GALLERY_HEIGHT = 130; // px under the chart once a run has previews

const runs = new Map(); // execution id -> {total, lambda, state, seen, events: [payload...]}
const previews = new Map(); // execution id -> {step, prompts, images, base, drift: [[step, value]...]}
const live = new Map(); // execution id -> number of websocket events received by this page
const charts = new Set(); // live Chart objects (one per LipschitzPersonalize node on the canvas)
const debug = (window.__lipschitzChart = window.__lipschitzChart || {});
let seen = 0; // order of run updates: the chart of a node with several execution ids shows the latest

// ---------------------------------------------------------------------------------------------
// data

function lastStep(run) {
  return run && run.events.length ? run.events[run.events.length - 1].step : 0;
}

function onProgress(d) {
  if (!d || d.node === undefined || d.node === null) return;
  const id = String(d.node);
  live.set(id, (live.get(id) || 0) + 1);
  let run = runs.get(id);
  // A step that does not advance means a new run of the same node: start a fresh series.
  if (!run || (run.events.length && d.step <= lastStep(run))) {
    run = { total: d.total, lambda: d.lambda, state: "running", events: [] };
    runs.set(id, run);
  }
  run.seen = ++seen;
  run.total = d.total;
  run.lambda = d.lambda;
  run.state = d.step >= d.total ? "completed" : "running";
  run.events.push(d);
  if (run.events.length > MAX_POINTS) run.events.splice(0, run.events.length - MAX_POINTS);
  redraw(id);
}

function onPreview(d) {
  if (!d || d.node === undefined || d.node === null) return;
  const id = String(d.node);
  live.set(id, (live.get(id) || 0) + 1);
  const have = previews.get(id);
  // The base's images come first (at the run's first step): a step that does not advance is a new run.
  const drift = have && d.step > have.step ? have.drift : [];
  previews.set(id, { ...d, drift: drift.concat([[d.step, d.drift]]) });
  redraw(id);
}

// Merge a server snapshot (authoritative up to its last step) with live events received since.
function mergeRun(id, snap) {
  const shown = previews.get(id);
  if (snap && snap.previews && (!shown || snap.previews.step >= shown.step)) previews.set(id, snap.previews);
  if (!snap || !Array.isArray(snap.events)) return;
  const have = runs.get(id);
  if (!snap.events.length && have && have.events.length) return;
  const upto = snap.events.length ? snap.events[snap.events.length - 1].step : 0;
  const newer = have ? have.events.filter((e) => e.step > upto) : [];
  const events = snap.events.concat(newer).slice(-MAX_POINTS);
  runs.set(id, {
    total: snap.total,
    lambda: snap.lambda,
    state: newer.length ? "running" : snap.state,
    seen: ++seen,
    events,
  });
}

async function refill() {
  try {
    const resp = await api.fetchApi(STATUS_ROUTE, { cache: "no-store" });
    if (!resp.ok) return;
    const data = await resp.json();
    for (const [id, snap] of Object.entries(data || {})) mergeRun(id, snap);
  } catch (err) {
    console.warn("[lipschitz] could not read " + STATUS_ROUTE, err);
    return;
  }
  redraw();
}

// One status read for all the charts a loaded graph attaches in the same moment.
let refillPending = null;
function refillSoon() {
  refillPending ??= new Promise((resolve) => setTimeout(resolve, 0)).then(() => {
    refillPending = null;
    return refill();
  });
  return refillPending;
}

function redraw(id) {
  for (const chart of charts) {
    if (id === undefined || chart.executionIds().includes(id)) chart.schedule();
  }
}

// ---------------------------------------------------------------------------------------------
// execution ids

const graphNodes = (graph) => graph.nodes ?? graph._nodes ?? [];

// The execution ids the server gives `node`: its id in the root graph, or one
// "<instance>:...:<id>" per subgraph instance (nested ones too) whose subgraph holds it.
function executionIds(node) {
  const root = app.graph;
  const local = String(node.id);
  if (!root || !node.graph || node.graph === root) return [local];
  const ids = [];
  const walk = (graph, prefix, depth) => {
    if (depth > 32) return; // a subgraph cannot contain itself; bound the walk anyway
    for (const n of graphNodes(graph)) {
      if (!n.isSubgraphNode?.() || !n.subgraph) continue;
      const path = `${prefix}${n.id}:`;
      if (n.subgraph === node.graph) ids.push(path + local);
      walk(n.subgraph, path, depth + 1);
    }
  };
  walk(root, "", 0);
  return ids;
}

// ---------------------------------------------------------------------------------------------
// drawing

function fmtValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "nan";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toPrecision(4);
}

function fmtEta(s) {
  if (!Number.isFinite(s) || s < 0) return "?";
  s = Math.round(s);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

class Chart {
  constructor(node) {
    this.node = node;
    this.pending = false;
    this.root = document.createElement("div");
    this.root.className = "lipschitz-chart";
    this.root.dataset.points = "0";
    Object.assign(this.root.style, {
      display: "flex", flexDirection: "column", width: "100%", height: "100%",
      boxSizing: "border-box", background: "#181818", borderRadius: "4px", overflow: "hidden",
    });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { flex: "1 1 auto", width: "100%", minHeight: "0" });
    this.info = document.createElement("div");
    this.info.className = "lipschitz-chart-info";
    Object.assign(this.info.style, {
      flex: "0 0 auto", font: "11px monospace", color: "#ccc", padding: "2px 6px",
      whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis",
    });
    this.info.textContent = "waiting for training steps";
    this.gallery = document.createElement("div");
    this.gallery.className = "lipschitz-preview";
    Object.assign(this.gallery.style, {
      flex: "0 0 auto", display: "none", gap: "8px", padding: "2px 6px 4px", overflowX: "auto",
      font: "10px monospace", color: "#aaa",
    });
    this.shown = null; // the preview whose images the gallery holds
    this.root.append(this.canvas, this.gallery, this.info);
    if (window.ResizeObserver) {
      this.observer = new ResizeObserver(() => this.schedule());
      this.observer.observe(this.canvas);
    }
  }

  executionIds() {
    return executionIds(this.node);
  }

  // The execution id drawn: the one whose run was updated last (the first one before any run).
  currentId() {
    const ids = this.executionIds();
    let best = ids.length ? ids[0] : null;
    for (const id of ids) {
      const run = runs.get(id);
      if (run && (!runs.get(best) || run.seen > runs.get(best).seen)) best = id;
    }
    return best;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  hasPreview() {
    const id = this.currentId();
    return id !== null && previews.has(id);
  }

  // One column per preview prompt: the base's image and the latest preview's, with the step.
  fillGallery(preview) {
    if (this.shown === preview) return;
    this.shown = preview;
    this.gallery.replaceChildren();
    this.gallery.style.display = preview ? "flex" : "none";
    if (!preview) return;
    const figure = (src, kind, caption) => {
      const box = document.createElement("figure");
      Object.assign(box.style, { margin: "0", textAlign: "center" });
      const img = document.createElement("img");
      img.src = src;
      img.className = "lipschitz-preview-image";
      img.dataset.kind = kind;
      img.dataset.step = String(kind === "base" ? 0 : preview.step);
      Object.assign(img.style, { height: "96px", width: "96px", objectFit: "contain", display: "block" });
      const label = document.createElement("figcaption");
      label.textContent = caption;
      box.append(img, label);
      return box;
    };
    preview.prompts.forEach((prompt, i) => {
      const column = document.createElement("div");
      column.title = prompt;
      const pair = document.createElement("div");
      Object.assign(pair.style, { display: "flex", gap: "2px" });
      pair.append(figure(preview.base[i], "base", "base"), figure(preview.images[i], "current", `step ${preview.step}`));
      const text = document.createElement("div");
      Object.assign(text.style, { maxWidth: "194px", overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap" });
      text.textContent = prompt;
      column.append(pair, text);
      this.gallery.append(column);
    });
    const min = this.node.computeSize();
    if (this.node.size[1] < min[1]) this.node.setSize([this.node.size[0], min[1]]);
  }

  dispose() {
    this.observer?.disconnect();
    charts.delete(this);
  }

  draw() {
    const id = this.currentId();
    const run = id === null ? undefined : runs.get(id);
    const events = run ? run.events : [];
    const preview = id === null ? undefined : previews.get(id);
    this.fillGallery(preview ?? null);
    const dpr = window.devicePixelRatio || 1;
    // A hidden widget (node off screen) has no layout size: keep drawing into the last size.
    const cssW = this.canvas.clientWidth || this.cssW || 320;
    const cssH = this.canvas.clientHeight || this.cssH || 200;
    this.cssW = cssW;
    this.cssH = cssH;
    if (this.canvas.width !== Math.round(cssW * dpr)) this.canvas.width = Math.round(cssW * dpr);
    if (this.canvas.height !== Math.round(cssH * dpr)) this.canvas.height = Math.round(cssH * dpr);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.fillStyle = "#181818";
    ctx.fillRect(0, 0, cssW, cssH);

    const first = Math.min(events.length ? events[0].step : 1, preview?.drift.length ? preview.drift[0][0] : Infinity);
    const total = Math.max(run ? run.total || 0 : 0, lastStep(run), first + 1);
    const pad = { l: 6, r: 6, t: 4, b: 2 };
    const labelH = 13;
    const panelH = (cssH - pad.t - pad.b) / SERIES.length;
    const x0 = pad.l + 3;
    const xw = Math.max(cssW - pad.l - pad.r - 6, 1);
    const xOf = (step) => x0 + (xw * (step - first)) / (total - first);
    let drawn = 0;
    ctx.font = "11px monospace";
    ctx.textBaseline = "top";

    SERIES.forEach((s, i) => {
      const top = pad.t + i * panelH;
      const plotTop = top + labelH;
      const plotH = Math.max(panelH - labelH - 4, 4);
      ctx.strokeStyle = "#333";
      ctx.lineWidth = 1;
      ctx.strokeRect(pad.l + 0.5, plotTop + 0.5, cssW - pad.l - pad.r - 1, plotH);

      const pts = [];
      const values = s.preview ? (preview?.drift ?? []) : events.map((e) => [e.step, e[s.key]]);
      for (const [st, v] of values) {
        if (typeof v === "number" && Number.isFinite(v)) pts.push([st, v]);
      }
      let lo = Infinity;
      let hi = -Infinity;
      for (const [, v] of pts) {
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      const [rawLo, rawHi] = [lo, hi];
      if (pts.length && hi - lo < 1e-12 * Math.max(Math.abs(hi), 1)) {
        lo -= 0.5 * Math.max(Math.abs(lo), 1e-12);
        hi += 0.5 * Math.max(Math.abs(hi), 1e-12);
      }
      const yOf = (v) => plotTop + 3 + (plotH - 6) * (1 - (v - lo) / (hi - lo));
      if (pts.length) {
        ctx.strokeStyle = s.color;
        ctx.fillStyle = s.color;
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        pts.forEach(([st, v], k) => (k ? ctx.lineTo(xOf(st), yOf(v)) : ctx.moveTo(xOf(st), yOf(v))));
        ctx.stroke();
        if (pts.length <= 60) {
          for (const [st, v] of pts) ctx.fillRect(xOf(st) - 1.5, yOf(v) - 1.5, 3, 3);
        }
      }
      if (!s.preview) drawn = i === 0 ? pts.length : Math.min(drawn, pts.length);

      ctx.fillStyle = s.color;
      const last = pts.length ? pts[pts.length - 1][1] : null;
      const label = s.preview ? `${s.label} (${preview?.drift_kind ?? "pixels"} vs base)` : s.label;
      ctx.fillText(`${label} ${last === null ? "-" : fmtValue(last)}`, pad.l + 2, top);
      if (pts.length) {
        ctx.fillStyle = "#888";
        const range = `min ${fmtValue(rawLo)}  max ${fmtValue(rawHi)}`;
        ctx.fillText(range, cssW - pad.r - 2 - ctx.measureText(range).width, top);
      }
    });

    const e = events.length ? events[events.length - 1] : null;
    if (e) {
      const state = run.state && run.state !== "running" ? `  ${run.state}` : "";
      this.info.textContent = `step ${e.step}/${run.total}  ${Number(e.steps_per_s).toFixed(2)} it/s  ` +
        `ETA ${fmtEta(e.eta_s)}  λ=${run.lambda}${state}`;
    } else {
      this.info.textContent = "waiting for training steps";
    }
    this.root.dataset.points = String(drawn);
    this.root.dataset.node = id ?? "";
    if (id === null) return; // a subgraph's node with no instance in the graph: it never runs
    debug[id] = { points: drawn, step: e ? e.step : 0, total: run ? run.total : 0,
                  state: run ? run.state : "idle", live: live.get(id) || 0,
                  preview: { step: preview ? preview.step : null, images: preview ? preview.images.length : 0,
                             drift: preview ? preview.drift.filter(([, v]) => Number.isFinite(v)).length : 0 } };
  }
}

function attachChart(node) {
  const chart = new Chart(node);
  const widget = node.addDOMWidget("lipschitz_chart", "lipschitz_chart", chart.root, {
    serialize: false, // not a node input: keep it out of the prompt ...
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => 220 + (chart.hasPreview() ? GALLERY_HEIGHT : 0),
  });
  widget.serialize = false; // ... and out of the workflow's widgets_values
  charts.add(chart);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    chart.dispose();
    return onRemoved?.apply(this, arguments);
  };
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0], 360), Math.max(node.size[1], min[1])]);
  // node.id (and a subgraph's instances) exist only after nodeCreated when a saved graph is
  // configured: read the server's runs a moment later.
  refillSoon().then(() => chart.schedule());
  return chart;
}

// Loaded twice if both WEB_DIRECTORY and pyproject's [tool.comfy] web register the folder:
// registering an extension name twice throws in the frontend, so only the first copy registers.
if (!window.__lipschitzChartExtension) {
  window.__lipschitzChartExtension = EXTENSION;
  app.registerExtension({
    name: EXTENSION,
    async setup() {
      api.addEventListener(EVENT, (ev) => onProgress(ev.detail));
      api.addEventListener(PREVIEW_EVENT, (ev) => onPreview(ev.detail));
      api.addEventListener("reconnected", () => refill());
      await refill();
    },
    nodeCreated(node) {
      if (node.comfyClass === NODE_CLASS || node.type === NODE_CLASS) attachChart(node);
    },
    loadedGraphNode(node) {
      if (node.comfyClass === NODE_CLASS || node.type === NODE_CLASS) redraw();
    },
  });
}
