#!/usr/bin/env python3
"""Write the shipped workflows that repeat a chain per model (``workflows/<name>.json``) from
their flat sources (``tools/workflow_sources/<name>.json``): each repeated sample-and-score
chain folded into instances of one subgraph (:func:`tools.fold_subgraph.fold`), the top level laid
out left to right (photos -> fine-tunes -> one box per model -> results) and opened at a zoom
that shows all of it on a 1920x1200 screen with the titles drawn.

Why from sources: a fold renumbers what it folds, so a folded file cannot be folded again; the
flat source is what a person edits (every node on one level), this script is how the shipped
file follows, and re-running it writes the same bytes. ``tests/test_workflows.py`` checks that
each shipped file is this script's output and that the server runs exactly the source's prompt.

    python tools/fold_workflows.py          # rewrite workflows/*.json from the sources
    python tools/fold_workflows.py --check  # exit 1 if a shipped file is not up to date

``personalize_and_export`` has no repeated chain (its two previews differ in file name and in
being muted) and stays hand-authored in ``workflows/``. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.fold_subgraph import fold

REPO = Path(__file__).resolve().parent.parent
SOURCES = REPO / "tools" / "workflow_sources"
SHIPPED = REPO / "workflows"
TITLE = 30      # px of a node's title bar above its pos (LiteGraph.NODE_TITLE_HEIGHT)
GAP = 40        # px between nodes of a column and between columns
PAD = 20        # px of a group box around its nodes (below the group's title bar)
GROUP_TITLE = 34
ORIGIN = (125, 290)  # the view offset: the graph starts right of the side bar, below the Run bar
GROUP_COLOR = "#3f789e"
# The sizes frontend 1.32.9 grows these nodes to on load (measured in the browser test): stored
# as they will be drawn, so that the layout leaves room for them.
DRAWN_SIZES = {"LipschitzPersonalize": [360, 902], "LipschitzLoadReferenceImages": [315, 126],
               "LipschitzLabeledGrid": [420, 466]}


Key = int | str  # a node id of the source, or "copy k": the instance of the k-th copy


@dataclass(frozen=True)
class Spec:
    """How one flat source is folded and laid out.

    ``groups``: the node ids of each copy of the chain, in the same order per copy (the first
    copy becomes the subgraph, named ``name``); ``titles``: one per copy (its instance's title).
    ``columns``: the top level, left to right; a column is a list of rows, a row a list of keys
    side by side in cells as wide as the column's widest node (so the cells of a column line
    up). ``inner``: the same for the subgraph's nodes (ids of the first copy). ``sizes``: node
    sizes to store, by key or node type (the frontend grows a node to its content on load, never
    shrinks it). ``boxes``: group titles and the keys each frames. ``scale``: the zoom the file
    opens at (at least the frontend's 0.57, below which it draws no text)."""

    name: str
    groups: list[list[int]]
    titles: list[str]
    columns: list[list[list[Key]]]
    inner: list[list[list[int]]]
    sizes: dict[Key, list[int]]
    boxes: list[tuple[str, list[Key]]]
    scale: float


def _prefix_free(title: str) -> str:
    """``"lambda 500: prompt 1"`` -> ``"prompt 1"``: the copy's name leaves the inner titles."""
    return title.split(": ", 1)[-1]


COMPARE_LAMBDA = Spec(
    name="Sample and score one lambda",
    groups=[[11, 12, 13, 14, 15, 16, 46, 47, 56, 57, 58], [18, 19, 20, 21, 22, 23, 48, 49, 59, 60, 61],
            [25, 26, 27, 28, 29, 30, 50, 51, 62, 63, 64], [32, 33, 34, 35, 36, 37, 52, 53, 65, 66, 67]],
    titles=["lambda 0: sample and score", "lambda 500: sample and score",
            "lambda 2000: sample and score", "lambda 10000: sample and score"],
    columns=[[[1], [2], [3], [54], [55], [44], [45]],
             [[10, 17, 24, 31], ["copy 0", "copy 1", "copy 2", "copy 3"], [4, 5, 6, 7], [8, 9, 42, 43]],
             [[38, 39], [40, 41], [68, 69]]],
    inner=[[[11], [12], [13]], [[14], [15], [16]], [[46], [47]], [[56], [57], [58]]],
    sizes={1: [460, 470], "CLIPTextEncode": [360, 110], "SaveImage": [320, 320], "copy": [360, 330]},
    boxes=[("Base model and photos", [2, 3]),
           ("Scoring models", [54, 55]),
           ("Drift reference (base)", [44, 45]),
           ("Fine-tune four lambdas, then sample and score each model (one subgraph)",
            [10, 17, 24, 31, "copy 0", "copy 1", "copy 2", "copy 3"]),
           ("Evaluation prompts and seed, drift prompt (the same for every model)", [4, 5, 6, 7, 8, 9, 42, 43]),
           ("Results: grid, training report, metrics", [38, 39, 40, 41, 68, 69])],
    scale=0.58)

DREAMBOOTH_VS_LIPSCHITZ = Spec(
    name="Sample and score one model",
    groups=[[18, 19, 20, 21, 22, 23, 34, 35, 40, 41, 42], [24, 25, 26, 27, 28, 29, 36, 37, 43, 44, 45]],
    titles=["DreamBooth: sample and score", "Lipschitz: sample and score"],
    columns=[[[1], [2], [3], [38], [39]],
             [[4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
             [[16, 17], ["copy 0", "copy 1"]],
             [[30, 31], [32, 33], [46, 47]]],
    inner=[[[18], [19], [20]], [[21], [22], [23]], [[34], [35]], [[40], [41], [42]]],
    sizes={1: [460, 520], "CLIPTextEncode": [360, 110], "SaveImage": [320, 320], 9: [360, 360], "copy": [360, 350]},
    boxes=[("Base model and photos", [2, 3]),
           ("Scoring models", [38, 39]),
           ("Prior preservation: class images from the base model", [4, 5, 6, 7, 8, 9]),
           ("Evaluation prompts and seed (both models)", [10, 11, 12, 13, 14, 15]),
           ("Fine-tune both ways, sample and score each", [16, 17, "copy 0", "copy 1"]),
           ("Results: grid, training report, metrics", [30, 31, 32, 33, 46, 47])],
    scale=0.58)

DRIFT_CHECK = Spec(
    name="Sample the three prompts",
    groups=[[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]],
    titles=["base model: three prompts", "personalized: three prompts"],
    columns=[[[1], [2], [3]],
             [[10]],
             [[4], [5], [6], [7], [8], [9]],
             [["copy 0"], ["copy 1"]],
             [[23, 24], [25, 26], [27, 28]]],
    inner=[[[11], [12], [13]], [[14], [15], [16]]],
    sizes={1: [460, 520], "CLIPTextEncode": [360, 110], "SaveImage": [320, 320], "copy": [360, 220]},
    boxes=[("Base model and photos", [2, 3]),
           ("Fine-tune", [10]),
           ("Prompts without the token", [4, 5, 6, 7, 8, 9]),
           ("Sample both models", ["copy 0", "copy 1"]),
           ("Results: grid, drift, metrics", [23, 24, 25, 26, 27, 28])],
    scale=0.58)

SPECS: dict[str, Spec] = {"compare_lambda": COMPARE_LAMBDA, "dreambooth_vs_lipschitz": DREAMBOOTH_VS_LIPSCHITZ,
                          "drift_check": DRIFT_CHECK}


def _size(spec: Spec, key: Key, node: dict) -> list[int]:
    """The size to store: the spec's for this key ("copy" for every instance) or node type, else
    the drawn size of the type, else the source's."""
    sizes = {**DRAWN_SIZES, **spec.sizes}
    for k in (key, str(key).split(" ")[0], node["type"]):
        if k in sizes:
            return list(sizes[k])
    return list(node["size"])


def _place(nodes: dict, columns: list[list[list[Key]]], sizes: Callable[[Key], list[int]],
           boxed: frozenset = frozenset()) -> None:
    """Columns left to right from x = 0, rows top to bottom from y = 0 (a node's title bar is
    above its pos); each column's cells as wide as its widest node; a row that starts a group
    box (its first key in ``boxed``) leaves room for the box's title bar."""
    x = 0
    for column in columns:
        cell = max(sizes(key)[0] for row in column for key in row)
        y = 0
        for row in column:
            if y and row[0] in boxed:
                y += GROUP_TITLE + PAD
            for k, key in enumerate(row):
                nodes[key]["pos"] = [x + k * (cell + GAP), y]
                nodes[key]["size"] = sizes(key)
            y += max(sizes(key)[1] for key in row) + TITLE + GAP
        x += max(len(row) for row in column) * (cell + GAP)


def _layout(folded: dict, spec: Spec) -> None:
    """The top level in columns, group boxes around the listed nodes, the opening view."""
    by_id = {n["id"]: n for n in folded["nodes"]}
    (sub,) = [s for s in folded["definitions"]["subgraphs"] if s["name"] == spec.name]
    instances = [n for n in folded["nodes"] if n["type"] == sub["id"]]
    nodes = {**by_id, **{f"copy {k}": n for k, n in enumerate(instances)}}
    keys = [key for column in spec.columns for row in column for key in row]
    missing = set(by_id) - {nodes[k]["id"] for k in keys}
    if missing:
        raise ValueError(f"{spec.name}: nodes {sorted(missing)} are in no column")
    _place(nodes, spec.columns, lambda key: _size(spec, key, nodes[key]),
           frozenset(keys[0] for _, keys in spec.boxes))
    folded["groups"] = []
    for gid, (title, members) in enumerate(spec.boxes, start=1):
        box = [nodes[k] for k in members]
        left = min(n["pos"][0] for n in box) - PAD
        top = min(n["pos"][1] for n in box) - TITLE - GROUP_TITLE
        right = max(n["pos"][0] + n["size"][0] for n in box) + PAD
        bottom = max(n["pos"][1] + n["size"][1] for n in box) + PAD
        folded["groups"].append({"id": gid, "title": title, "bounding": [left, top, right - left, bottom - top],
                                 "color": GROUP_COLOR, "font_size": 24, "flags": {}})
    folded.setdefault("extra", {})["ds"] = {"scale": spec.scale, "offset": list(ORIGIN)}


def build(stem: str) -> dict:
    """The shipped workflow ``stem``, folded and laid out from its source."""
    spec = SPECS[stem]
    source = json.loads((SOURCES / f"{stem}.json").read_text())
    first = {n["id"]: n for n in source["nodes"] if n["id"] in spec.groups[0]}
    _place(first, spec.inner, lambda key: list(first[key]["size"]))  # the subgraph's own layout
    folded = fold(source, spec.groups, spec.name, spec.titles, inner_title=_prefix_free)
    _layout(folded, spec)
    return folded


def render(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for stem in SPECS:
        text, path = render(build(stem)), SHIPPED / f"{stem}.json"
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(REPO)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
