#!/usr/bin/env python3
"""Convert a ComfyUI *UI* workflow (what the frontend saves, what ``workflows/`` ships) into the
*API* format that ``POST /prompt`` takes, driven by the server's ``/object_info``.

ComfyUI 0.3.75 has no server-side converter; the frontend does this in ``graphToPrompt``.
This module reproduces the parts of it that matter for plain graphs:

* ``widgets_values`` are matched, in order, to the node's widget inputs as the frontend
  derives them from ``/object_info``: required then optional (``input_order``), inputs of
  the types INT, FLOAT, STRING, BOOLEAN and COMBO (a list of options) that are not
  ``forceInput``.  Frontend-only values are skipped: the ``control_after_generate`` value
  after an INT widget that asks for it (or is named ``seed`` / ``noise_seed``), the control
  and filter values after a COMBO with ``control_after_generate``, and the upload button's
  value after a COMBO with ``image_upload`` / ``video_upload`` / ``audio_upload`` /
  ``animated_image_upload``;
* links (``[id, from_node, from_slot, to_node, to_slot, type]``, and each input's ``link``)
  become ``[node_id, slot]``; ``Reroute`` nodes are followed; a ``PrimitiveNode`` feeding a
  widget is inlined as its value;
* UI-only nodes (``Note``, ``MarkdownNote``, ``PrimitiveNode``, ``Reroute``) are dropped;
  muted nodes (mode 2) are left out together with the inputs they fed; bypassed nodes
  (mode 4) are left out and their consumers get the bypassed node's input of the same type
  (same slot first), as the frontend does.

Nothing here knows any particular workflow.  :func:`apply_overrides` and
:func:`small_run_overrides` shrink a converted graph for tests and the CPU demo (another
checkpoint, fewer steps, a smaller resolution).

    from workflow_convert import convert, apply_overrides, small_run_overrides
    api = convert(json.load(open("workflows/compare_lambda.json")), client.object_info())
    api = apply_overrides(api, small_run_overrides("tiny_sd15.safetensors"))

Standard library only.  ``python tools/workflow_convert.py WORKFLOW.json --url URL`` prints
the API graph.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Iterable

UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


class WorkflowConversionError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# widgets as the frontend builds them


def widget_layout(node_info: dict) -> list[tuple[str, int, Any]]:
    """``(input name, frontend-only values after it, default)`` of each widget, in the order
    the frontend lays them out (and saves them in ``widgets_values``)."""
    inputs = node_info.get("input") or {}
    order = node_info.get("input_order") or {cat: list(spec) for cat, spec in inputs.items()}
    layout = []
    for category in ("required", "optional"):
        specs = inputs.get(category) or {}
        for name in order.get(category) or []:
            spec = specs.get(name)
            if not spec:
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_combo = isinstance(kind, list) or kind == "COMBO"
            if not (is_combo or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            extra = 0
            if kind == "INT" and opts.get("control_after_generate", name in SEED_NAMES):
                extra += 1                       # control_after_generate
            if is_combo and opts.get("control_after_generate"):
                extra += 2                       # control_after_generate + control_filter_list
            if is_combo and any(opts.get(flag) for flag in UPLOAD_FLAGS):
                extra += 1                       # the upload button's value
            default = opts.get("default")
            if default is None and is_combo:
                options = kind if isinstance(kind, list) else opts.get("options") or []
                default = options[0] if options else None
            layout.append((name, extra, default))
    return layout


def widget_inputs(node: dict, node_info: dict, strict: bool = True) -> dict[str, Any]:
    """The node's widget values by input name (frontend-only values dropped)."""
    values = node.get("widgets_values")
    layout = widget_layout(node_info)
    where = f"node {node.get('id')} ({node.get('type')})"
    if isinstance(values, dict):  # some custom nodes save their widgets by name
        return {name: values[name] for name, _, _ in layout if name in values}
    values = list(values or [])
    out: dict[str, Any] = {}
    i = 0
    for name, extra, default in layout:
        if i < len(values):
            out[name] = values[i]
        elif default is not None:
            if strict:
                raise WorkflowConversionError(f"{where}: no saved value for widget {name!r} "
                                              f"({len(values)} values for {len(layout)} widgets)")
            out[name] = default
        i += 1 + extra
    if strict and i != len(values):
        names = [n for n, _, _ in layout]
        raise WorkflowConversionError(f"{where}: {len(values)} widget values but the frontend lays out "
                                      f"{i} for the widgets {names}: {values!r}")
    return out


# --------------------------------------------------------------------------------------------
# graph


def _input_name(inp: dict) -> str:
    widget = inp.get("widget")
    return widget.get("name") if isinstance(widget, dict) and widget.get("name") else inp["name"]


class _Graph:
    def __init__(self, workflow: dict, object_info: dict):
        if "nodes" not in workflow or "links" not in workflow:
            raise WorkflowConversionError("not a UI workflow (no 'nodes' / 'links'); API graphs need no conversion")
        self.info = object_info
        self.nodes = {int(n["id"]): n for n in workflow["nodes"]}
        self.links: dict[int, tuple[int, int]] = {}
        for link in workflow["links"]:
            if isinstance(link, dict):  # newer serialisation (version 1)
                self.links[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]))
            else:
                self.links[int(link[0])] = (int(link[1]), int(link[2]))

    def mode(self, node: dict) -> int:
        return int(node.get("mode") or 0)

    def resolve(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Follow a link upstream: ``("link", [id, slot])``, ``("value", v)`` or None (drop)."""
        if link_id is None:
            return None
        if link_id not in self.links:
            raise WorkflowConversionError(f"link {link_id} is used by a node but missing from 'links'")
        node_id, slot = self.links[link_id]
        if (node_id, slot) in seen:
            raise WorkflowConversionError(f"link cycle through node {node_id}")
        seen = seen | {(node_id, slot)}
        node = self.nodes.get(node_id)
        if node is None:
            raise WorkflowConversionError(f"link {link_id} comes from node {node_id}, which does not exist")
        kind = node.get("type")
        if self.mode(node) == MODE_NEVER:
            return None
        if kind == "Reroute":
            inputs = node.get("inputs") or []
            return self.resolve(inputs[0].get("link") if inputs else None, seen)
        if kind == "PrimitiveNode":
            values = node.get("widgets_values") or []
            if not values:
                raise WorkflowConversionError(f"PrimitiveNode {node_id} has no value")
            return ("value", values[0])
        if self.mode(node) == MODE_BYPASS:
            outputs = node.get("outputs") or []
            out_type = outputs[slot].get("type") if slot < len(outputs) else None
            inputs = node.get("inputs") or []
            candidates = ([inputs[slot]] if slot < len(inputs) else []) + inputs
            for inp in candidates:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return self.resolve(inp["link"], seen)
            return None
        return ("link", [str(node_id), slot])

    def convert(self, strict: bool) -> dict[str, dict]:
        prompt: dict[str, dict] = {}
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            kind = node.get("type")
            if kind in UI_ONLY_TYPES or self.mode(node) in (MODE_NEVER, MODE_BYPASS):
                continue
            info = self.info.get(kind)
            if info is None:
                raise WorkflowConversionError(f"node {node_id} has type {kind!r}, which this server does not "
                                              f"know (a custom node pack missing, or a subgraph)")
            inputs = widget_inputs(node, info, strict)
            for inp in node.get("inputs") or []:
                resolved = self.resolve(inp.get("link"))
                name = _input_name(inp)
                if resolved is None:
                    if inp.get("link") is not None and inp.get("widget") is None:
                        inputs.pop(name, None)  # fed by a muted node: left out, like the frontend
                    continue
                inputs[name] = resolved[1]
            entry = {"class_type": kind, "inputs": inputs}
            title = node.get("title")
            entry["_meta"] = {"title": title or info.get("display_name") or kind}
            prompt[str(node_id)] = entry
        return prompt


def convert(workflow: dict, object_info: dict, strict: bool = True) -> dict[str, dict]:
    """UI workflow -> API prompt ``{node_id: {"class_type", "inputs", "_meta"}}``.

    ``object_info`` is the server's ``GET /object_info`` (all nodes).  ``strict`` makes a
    node whose ``widgets_values`` do not fit its widgets an error (else missing values take
    the input's default and surplus ones are ignored).
    """
    return _Graph(workflow, object_info).convert(strict)


def output_nodes(prompt: dict[str, dict], object_info: dict) -> list[str]:
    """Ids of the API graph's output nodes (SaveImage, PreviewImage, ...)."""
    return [nid for nid, node in prompt.items() if (object_info.get(node["class_type"]) or {}).get("output_node")]


# --------------------------------------------------------------------------------------------
# overrides (tests, CPU demo)


def apply_overrides(prompt: dict[str, dict], rules: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """A copy of ``prompt`` with literal inputs replaced.

    ``rules`` maps a class_type (or ``"*"`` for every node) to ``{input_name: value}``; a
    callable value gets the current value (None if absent) and returns the new one.  A
    ``"*"`` rule only replaces inputs a node already has; a class rule also sets optional
    inputs that are absent.  Linked inputs are never replaced.
    """
    out = copy.deepcopy(prompt)
    for node in out.values():
        inputs = node["inputs"]
        for scope in ("*", node["class_type"]):
            for name, value in (rules.get(scope) or {}).items():
                if isinstance(inputs.get(name), list):
                    continue
                if scope == "*" and name not in inputs:
                    continue
                inputs[name] = value(inputs.get(name)) if callable(value) else value
    return out


def small_run_overrides(ckpt_name: str | None = None, train_steps: int = 2, resolution: int = 64,
                        sample_steps: int = 2, sample_resolution: int | None = None,
                        max_batch: int | None = None) -> dict[str, dict[str, Any]]:
    """Rules for :func:`apply_overrides` that make any of the pack's workflows quick: every
    ``ckpt_name`` -> ``ckpt_name``, training ``train_steps`` at ``resolution`` (reference photos
    too), empty latents at ``sample_resolution`` (default ``resolution``) with at most
    ``max_batch`` images, samplers at ``sample_steps``."""
    sample_resolution = sample_resolution or resolution
    rules: dict[str, dict[str, Any]] = {
        "LipschitzPersonalize": {"steps": train_steps, "resolution": resolution},
        "LipschitzLoadReferenceImages": {"resolution": resolution},
        "EmptyLatentImage": {"width": sample_resolution, "height": sample_resolution},
        "KSampler": {"steps": sample_steps},
        "KSamplerAdvanced": {"steps": sample_steps, "end_at_step": sample_steps},
    }
    if max_batch is not None:
        rules["EmptyLatentImage"]["batch_size"] = lambda n: min(int(n or 1), max_batch)
    if ckpt_name:
        rules["*"] = {"ckpt_name": ckpt_name}
    return rules


def _main(argv: Iterable[str] | None = None) -> int:
    import argparse
    import urllib.request

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running ComfyUI, e.g. http://127.0.0.1:8188")
    src.add_argument("--object-info", help="a saved GET /object_info JSON file")
    args = ap.parse_args(argv)
    if args.url:
        with urllib.request.urlopen(args.url.rstrip("/") + "/object_info", timeout=60) as resp:
            info = json.load(resp)
    else:
        with open(args.object_info) as f:
            info = json.load(f)
    with open(args.workflow) as f:
        print(json.dumps(convert(json.load(f), info), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
