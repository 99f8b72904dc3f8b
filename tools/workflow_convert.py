#!/usr/bin/env python3
"""Convert a ComfyUI *UI* workflow (what the frontend saves, what ``workflows/`` ships) into the
*API* format that ``POST /prompt`` takes, driven by the server's ``/object_info``.

ComfyUI 0.3.75 has no server-side converter; the frontend does this in ``graphToPrompt``.
This module reproduces the parts of it that matter for the pack's graphs:

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
* subgraphs (``definitions.subgraphs``; an instance's ``type`` is its definition's id) are
  flattened as the frontend's ``graphToPrompt`` does (1.32.9, ``ExecutableNodeDTO``): every
  node inside an instance becomes a node of the prompt named by the instance ids and its own
  id joined by ``:`` (``"50:43"``, nested ``"50:7:43"``, the id the server reports it under); a
  link from the subgraph's input node (id -10) is the instance's input link, followed one
  level up; a link to an instance's output is followed to what feeds the subgraph's output node
  (id -20) at that slot. A bypassed instance passes its inputs through like any bypassed node
  (1.32.9's ``resolveOutput`` does); a muted or bypassed instance's inner nodes are left out,
  what muting an instance means to a user (1.32.9's DTOs read only each inner node's own mode:
  not checked by running). A promoted widget (an instance input with no link that sets an inner
  widget) is refused: the shipped files link such inputs. So is a ``PrimitiveNode`` feeding an
  instance: 1.32.9 sends the inner widgets' own values, not the primitive's (seen in the browser
  test), so no prompt would say what the graph shows;
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


SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20  # the ids of a subgraph's input and output nodes


def _links(graph: dict) -> dict[int, tuple[int, int, int, int]]:
    """link id -> (origin node, origin slot, target node, target slot), from either serialisation."""
    out = {}
    for link in graph.get("links") or []:
        if isinstance(link, dict):  # subgraph definitions and the newer root serialisation (version 1)
            out[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]),
                                    int(link["target_id"]), int(link["target_slot"]))
        else:
            out[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]))
    return out


class _Graph:
    """One level of a workflow as one instance sees it: the root graph (``path`` empty), or a
    subgraph definition inside the instance ``path[-1]`` of ``parent``. A node's API id is its
    instance path and its own id joined by ``:`` (``"50:43"``), as the frontend's
    ``ExecutableNodeDTO`` names it and the server reports it."""

    def __init__(self, graph: dict, object_info: dict, subgraphs: dict[str, dict],
                 path: tuple[str, ...] = (), parent: _Graph | None = None):
        if "nodes" not in graph or "links" not in graph:
            raise WorkflowConversionError("not a UI workflow (no 'nodes' / 'links'); API graphs need no conversion")
        self.info, self.subgraphs, self.path, self.parent = object_info, subgraphs, path, parent
        self.nodes = {int(n["id"]): n for n in graph["nodes"]}
        self.links = _links(graph)
        self._inner: dict[int, _Graph] = {}

    def mode(self, node: dict) -> int:
        return int(node.get("mode") or 0)

    def api_id(self, node_id: int) -> str:
        return ":".join((*self.path, str(node_id)))

    def inner(self, node_id: int) -> _Graph:
        """The subgraph that instance ``node_id`` of this graph runs."""
        if node_id not in self._inner:
            self._inner[node_id] = _Graph(self.subgraphs[self.nodes[node_id]["type"]], self.info, self.subgraphs,
                                          (*self.path, str(node_id)), self)
        return self._inner[node_id]

    def resolve(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Follow a link upstream: ``("link", [id, slot])``, ``("value", v)`` or None (drop)."""
        if link_id is None:
            return None
        if link_id not in self.links:
            raise WorkflowConversionError(f"link {link_id} is used by a node but missing from 'links'")
        node_id, slot = self.links[link_id][:2]
        if (self.path, node_id, slot) in seen:
            raise WorkflowConversionError(f"link cycle through node {self.api_id(node_id)}")
        seen = seen | {(self.path, node_id, slot)}
        if node_id == SUBGRAPH_INPUT:  # the instance's input of that slot, one level up
            instance = self.parent.nodes[int(self.path[-1])]
            inp = (instance.get("inputs") or [])[slot]
            if inp.get("link") is None and inp.get("widget") is not None:
                raise WorkflowConversionError(f"subgraph instance {self.parent.api_id(instance['id'])}: the promoted "
                                              f"widget {inp['name']!r} is not supported here; link the input instead")
            outer = self.parent.links.get(inp.get("link"))
            if outer and (self.parent.nodes.get(outer[0]) or {}).get("type") == "PrimitiveNode":
                raise WorkflowConversionError(
                    f"subgraph instance {self.parent.api_id(instance['id'])}: input {inp['name']!r} comes from a "
                    f"PrimitiveNode, whose value the frontend does not pass into a subgraph (the inner widgets keep "
                    f"their own values); feed it from a Primitive node that runs (PrimitiveInt, PrimitiveFloat, ...)")
            return self.parent.resolve(inp.get("link"), seen)
        node = self.nodes.get(node_id)
        if node is None:
            raise WorkflowConversionError(f"link {link_id} comes from node {self.api_id(node_id)}, which does not exist")
        kind = node.get("type")
        if self.mode(node) == MODE_NEVER:
            return None
        if kind == "Reroute":
            inputs = node.get("inputs") or []
            return self.resolve(inputs[0].get("link") if inputs else None, seen)
        if kind == "PrimitiveNode":
            values = node.get("widgets_values") or []
            if not values:
                raise WorkflowConversionError(f"PrimitiveNode {self.api_id(node_id)} has no value")
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
        if kind in self.subgraphs:  # what the subgraph feeds to its output node at that slot
            inner = self.inner(node_id)
            fed = [lid for lid, (*_, dst, dst_slot) in inner.links.items() if dst == SUBGRAPH_OUTPUT and dst_slot == slot]
            return inner.resolve(fed[0], seen) if fed else None
        return ("link", [self.api_id(node_id), slot])

    def convert(self, strict: bool, prompt: dict[str, dict]) -> dict[str, dict]:
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            kind = node.get("type")
            if kind in UI_ONLY_TYPES or self.mode(node) in (MODE_NEVER, MODE_BYPASS):
                continue
            if kind in self.subgraphs:
                self.inner(node_id).convert(strict, prompt)
                continue
            info = self.info.get(kind)
            if info is None:
                raise WorkflowConversionError(f"node {self.api_id(node_id)} has type {kind!r}, which this server does "
                                              f"not know (a custom node pack missing, or a subgraph not in "
                                              f"'definitions')")
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
            prompt[self.api_id(node_id)] = entry
        return prompt


def convert(workflow: dict, object_info: dict, strict: bool = True) -> dict[str, dict]:
    """UI workflow -> API prompt ``{node_id: {"class_type", "inputs", "_meta"}}``.

    ``object_info`` is the server's ``GET /object_info`` (all nodes).  ``strict`` makes a
    node whose ``widgets_values`` do not fit its widgets an error (else missing values take
    the input's default and surplus ones are ignored).
    """
    subgraphs = {sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    return _Graph(workflow, object_info, subgraphs).convert(strict, {})


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
