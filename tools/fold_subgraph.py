"""Fold repeated chains of a UI workflow into instances of one subgraph (ComfyUI frontend
subgraphs: ``definitions.subgraphs``, an instance's ``type`` is its definition's id).

A workflow that repeats the same chain per model (sample, decode, score) reads as one box per
model once each copy is an instance of one shared definition: the user sees and edits the chain
once. The copies must be exact (same node types in the same order, same widget values: one
definition holds one set of values); what differs between them is only where their inputs come
from and where their outputs go, which become the instance's links.

    from fold_subgraph import fold
    folded = fold(workflow, [[11, 12, 13], [18, 19, 20]], "Sample and score")

Nothing here knows a particular workflow; ``tools/workflow_convert.py`` flattens the result
back into the API prompt as the frontend does. Standard library only.
"""
from __future__ import annotations

import copy
import uuid
from collections.abc import Callable

SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20
NAMESPACE = uuid.UUID("5b2f7c1e-9d8a-4f3b-a0c6-2e1d4b7a9c31")  # stable ids: a re-fold writes the same file
ROW = 22  # px per slot row of an instance node (the frontend's slot height, rounded up)


class FoldError(ValueError):
    pass


def _link_tuple(link) -> tuple[int, int, int, int, int, str]:
    if isinstance(link, dict):
        return (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"])
    return tuple(link)


def _check_copies(nodes: dict[int, dict], groups: list[list[int]]) -> None:
    template = [nodes[i] for i in groups[0]]
    for group in groups[1:]:
        if len(group) != len(template):
            raise FoldError(f"group {group} has {len(group)} nodes, the first {len(template)}")
        for a, nid in zip(template, group):
            b = nodes[nid]
            if a["type"] != b["type"] or a.get("widgets_values") != b.get("widgets_values") or a.get("mode", 0) != b.get("mode", 0):
                raise FoldError(f"node {nid} ({b['type']}) is not a copy of node {a['id']} ({a['type']}): "
                                "one subgraph holds one set of widget values")


def fold(workflow: dict, groups: list[list[int]], name: str, titles: list[str] | None = None,
         inner_title: Callable[[str], str] | None = None) -> dict:
    """A copy of ``workflow`` with each group of node ids replaced by an instance (titled
    ``titles[k]``, default ``name``) of one new subgraph named ``name``, built from the first
    group. Links from outside a group become the subgraph's inputs (one per distinct source in
    the first group), links to outside its outputs (one per distinct inner output).
    ``inner_title`` renames the inner nodes' titles (the first group's name a copy: "lambda 0:
    prompt 1" is "prompt 1" in every instance)."""
    wf = copy.deepcopy(workflow)
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lt[0]: lt for lt in map(_link_tuple, wf["links"])}
    _check_copies(nodes, groups)
    template = groups[0]
    index = {nid: i for i, nid in enumerate(template)}
    members = [set(g) for g in groups]

    # Boundary of the first group: inputs keyed by their source, outputs by the inner slot.
    inputs: list[dict] = []        # {"key": (origin, slot), "type", "name", "targets": [(i, input slot)]}
    by_source: dict[tuple[int, int], dict] = {}
    for i, nid in enumerate(template):
        for s, inp in enumerate(nodes[nid].get("inputs") or []):
            if inp.get("link") is None:
                continue
            _, origin, oslot, *_ = links[inp["link"]]
            if origin in members[0]:
                continue
            if (origin, oslot) not in by_source:
                # A one-output source's title says what it is ("prompt 2"); else the input's name.
                source = nodes[origin]
                label = source.get("title") if source.get("title") and len(source.get("outputs") or []) == 1 else inp["name"]
                if label in {x["name"] for x in inputs}:
                    label = f"{label} {len(inputs)}"
                by_source[(origin, oslot)] = {"key": (origin, oslot), "type": inp["type"], "name": label, "targets": []}
                inputs.append(by_source[(origin, oslot)])
            by_source[(origin, oslot)]["targets"].append((i, s))
    outputs: list[dict] = []       # {"inner": (i, slot), "type", "name"}
    for lid, origin, oslot, target, _, typ in links.values():
        if origin in members[0] and target not in members[0] and (index[origin], oslot) not in [o["inner"] for o in outputs]:
            title = nodes[origin].get("title")
            out_name = (inner_title or str)(title) if title else nodes[origin]["outputs"][oslot]["name"]
            outputs.append({"inner": (index[origin], oslot), "type": typ, "name": out_name})
    outputs.sort(key=lambda o: o["inner"])

    sid = str(uuid.uuid5(NAMESPACE, name))
    definition = _definition(sid, name, [nodes[n] for n in template], links, members[0], inputs, outputs)
    if inner_title:
        for n in definition["nodes"]:
            if n.get("title"):
                n["title"] = inner_title(n["title"])

    # The root graph: the groups' nodes out, one instance per group in, links rewired.
    next_node, next_link = wf["last_node_id"] + 1, wf["last_link_id"] + 1
    removed = set().union(*members)
    new_links = [lt for lt in links.values() if lt[1] not in removed and lt[3] not in removed]
    instances = []
    for k, group in enumerate(groups):
        inst = {"id": next_node, "type": sid, "pos": list(nodes[group[0]]["pos"]),
                "size": [320, ROW * (max(len(inputs), len(outputs)) + 1)], "flags": {}, "order": 0, "mode": 0,
                "inputs": [], "outputs": [], "title": (titles or [name] * len(groups))[k], "properties": {},
                "widgets_values": []}
        next_node += 1
        for j, port in enumerate(inputs):
            i, s = port["targets"][0]
            _, origin, oslot, *_ = links[nodes[group[i]]["inputs"][s]["link"]]
            for i2, s2 in port["targets"][1:]:  # the same source in every copy, or no shared input
                if links[nodes[group[i2]]["inputs"][s2]["link"]][1:3] != (origin, oslot):
                    raise FoldError(f"group {group}: {port['name']!r} comes from different nodes")
            new_links.append((next_link, origin, oslot, inst["id"], j, port["type"]))
            inst["inputs"].append({"name": port["name"], "type": port["type"], "link": next_link})
            next_link += 1
        for j, port in enumerate(outputs):
            i, s = port["inner"]
            inst["outputs"].append({"name": port["name"], "type": port["type"], "links": []})
            for _, origin, oslot, target, tslot, typ in sorted(links.values()):
                if (origin, oslot) != (group[i], s) or target in members[k]:
                    continue
                new_links.append((next_link, inst["id"], j, target, tslot, typ))
                nodes[target]["inputs"][tslot]["link"] = next_link
                inst["outputs"][j]["links"].append(next_link)
                next_link += 1
        instances.append(inst)
    wf["nodes"] = [n for n in wf["nodes"] if n["id"] not in removed] + instances
    for n in wf["nodes"]:  # every output's link list from the final link table
        for slot, out in enumerate(n.get("outputs") or []):
            out["links"] = [lt[0] for lt in new_links if lt[1] == n["id"] and lt[2] == slot]
    wf["links"] = [list(lt) for lt in sorted(new_links)]
    wf["last_node_id"], wf["last_link_id"] = next_node - 1, next_link - 1
    wf.setdefault("definitions", {}).setdefault("subgraphs", []).append(definition)
    return wf


def _definition(sid: str, name: str, template: list[dict], links: dict, members: set[int],
                inputs: list[dict], outputs: list[dict]) -> dict:
    """The subgraph: the first group's nodes (their ids kept), its inner links, and links from
    the input node (-10) and to the output node (-20)."""
    inner = [copy.deepcopy(n) for n in template]
    by_id = {n["id"]: n for n in inner}
    out_links: list[dict] = []

    def add(origin: int, oslot: int, target: int, tslot: int, typ: str) -> int:
        lid = len(out_links) + 1
        out_links.append({"id": lid, "origin_id": origin, "origin_slot": oslot, "target_id": target,
                          "target_slot": tslot, "type": typ})
        return lid

    for n in inner:
        for inp in n.get("inputs") or []:
            inp["link"] = None
        for out in n.get("outputs") or []:
            out["links"] = []
    for lid, origin, oslot, target, tslot, typ in sorted(links.values()):
        if origin in members and target in members:
            new = add(origin, oslot, target, tslot, typ)
            by_id[target]["inputs"][tslot]["link"] = new
            by_id[origin]["outputs"][oslot]["links"].append(new)
    io_inputs = []
    for j, port in enumerate(inputs):
        ids = []
        for i, s in port["targets"]:
            ids.append(add(SUBGRAPH_INPUT, j, template[i]["id"], s, port["type"]))
            inner[i]["inputs"][s]["link"] = ids[-1]
        io_inputs.append({"id": str(uuid.uuid5(NAMESPACE, f"{name}/in/{j}")), "name": port["name"],
                          "type": port["type"], "linkIds": ids})
    io_outputs = []
    for j, port in enumerate(outputs):
        i, s = port["inner"]
        lid = add(inner[i]["id"], s, SUBGRAPH_OUTPUT, j, port["type"])
        inner[i]["outputs"][s]["links"].append(lid)
        io_outputs.append({"id": str(uuid.uuid5(NAMESPACE, f"{name}/out/{j}")), "name": port["name"],
                           "type": port["type"], "linkIds": [lid]})
    xs = [n["pos"][0] for n in inner]
    ys = [n["pos"][1] for n in inner]
    right = max(n["pos"][0] + n["size"][0] for n in inner)
    return {"id": sid, "version": 1, "revision": 0, "config": {}, "name": name,
            "state": {"lastGroupId": 0, "lastNodeId": max(by_id), "lastLinkId": len(out_links), "lastRerouteId": 0},
            "inputNode": {"id": SUBGRAPH_INPUT, "bounding": [min(xs) - 260, min(ys), 140, 40 + 20 * len(inputs)]},
            "outputNode": {"id": SUBGRAPH_OUTPUT, "bounding": [right + 100, min(ys), 140, 40 + 20 * len(outputs)]},
            "inputs": io_inputs, "outputs": io_outputs, "widgets": [], "nodes": inner, "groups": [],
            "links": out_links, "extra": {}}
