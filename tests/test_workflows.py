"""The shipped workflows (workflows/*.json), the UI->API converter and the grid node.

Every shipped file is converted as it is (not a hand-written twin) with the server's own
``/object_info``, shrunk for the tiny checkpoint (few steps, 64 px), run on a real server, and
every output node must have produced its files; their metrics tables must hold a number in
every cell.  The evaluation encoders are the tiny random ones (``tools/make_tiny_encoders.py``)
linked under the real models' names the workflows load.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipschitz_personalize.trainer.render import grid
from tools import fold_workflows
from tools.comfy_server import PACK_DIR_NAME
from tools.fold_subgraph import SUBGRAPH_INPUT, SUBGRAPH_OUTPUT, FoldError, fold
from tools.graphs import CKPT, install_subject
from tools.make_tiny_encoders import ensure, stand_in
from tools.workflow_convert import (WorkflowConversionError, apply_overrides, convert, output_nodes,
                                    small_run_overrides, widget_inputs, widget_layout)

REPO = Path(__file__).resolve().parent.parent
EVAL_DIR = REPO / ".comfyui" / "models" / "eval"  # `make tiny-encoders`
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
RES = 64         # training resolution (the node's minimum)
SAMPLE_RES = 32  # sampling: 4x4 latents, the VAE decode dominates a tiny run


# --------------------------------------------------------------------------------------------
# converter units (object_info shaped like 0.3.75's, no server)

INFO = {
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
            "sampler_name": [["euler", "ddim"], {}], "scheduler": [["normal", "karras"], {}],
            "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "output_node": False},
    "Trainer": {  # an INT named seed without the option (the frontend still adds the control)
        "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 1}]},
                  "optional": {"flag": ["BOOLEAN", {"default": True}], "mode": ["COMBO", {"options": ["a", "b"]}],
                               "noise_seed": ["INT", {"control_after_generate": False}],
                               "count": ["INT", {"forceInput": True}]}},
        "input_order": {"required": ["model", "seed"], "optional": ["flag", "mode", "noise_seed", "count"]},
        "output": ["MODEL"], "output_node": False},
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"], "output_node": False},
    "PickCombo": {"input": {"required": {"choice": [["x", "y"], {"control_after_generate": True}],
                                         "strength": ["FLOAT", {"default": 1.0}]}},
                  "input_order": {"required": ["choice", "strength"]}, "output": ["STRING"], "output_node": False},
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"], {}]}},
                               "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP", "VAE"],
                               "output_node": False},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}, "output": [], "output_node": True},
}


def _node(nid, kind, widgets=(), inputs=(), mode=0, outputs=1):
    return {"id": nid, "type": kind, "mode": mode, "pos": [100 * nid, 0], "size": [90, 60], "widgets_values": list(widgets),
            "inputs": [{"name": n, "type": t, "link": l, **({"widget": {"name": n}} if w else {})}
                       for n, t, l, w in inputs],
            "outputs": [{"name": "out", "type": "MODEL", "links": []} for _ in range(outputs)]}


def test_layout_follows_the_frontend_widget_rules():
    assert widget_layout(INFO["KSampler"]) == [("seed", 1, 0), ("steps", 0, 20), ("cfg", 0, 8.0),
                                               ("sampler_name", 0, "euler"), ("scheduler", 0, "normal"),
                                               ("denoise", 0, 1.0)]
    # seed by name: +1; explicit control_after_generate False: none; forceInput: no widget.
    assert [(n, e) for n, e, _ in widget_layout(INFO["Trainer"])] == [("seed", 1), ("flag", 0), ("mode", 0), ("noise_seed", 0)]
    assert [(n, e) for n, e, _ in widget_layout(INFO["LoadImage"])] == [("image", 1)]
    assert [(n, e) for n, e, _ in widget_layout(INFO["PickCombo"])] == [("choice", 2), ("strength", 0)]


def test_control_after_generate_and_upload_values_are_skipped():
    wf = {"nodes": [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
        # A KSampler exactly as ComfyUI's own templates save it.
        _node(2, "KSampler", [599575228983496, "randomize", 20, 6, "euler", "normal", 1],
              [("model", "MODEL", 1, False)]),
        _node(3, "Trainer", [7, "fixed", False, "b", 5], [("model", "MODEL", 2, False)]),
        _node(4, "LoadImage", ["b.png", "image"]),
        _node(5, "PickCombo", ["y", "increment", "", 0.5]),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 0, 3, 0, "MODEL"]]}
    api = convert(wf, INFO)
    assert api["2"]["inputs"] == {"seed": 599575228983496, "steps": 20, "cfg": 6, "sampler_name": "euler",
                                  "scheduler": "normal", "denoise": 1, "model": ["1", 0]}
    assert api["3"]["inputs"] == {"seed": 7, "flag": False, "mode": "b", "noise_seed": 5, "model": ["1", 0]}
    assert api["4"]["inputs"] == {"image": "b.png"}
    assert api["5"]["inputs"] == {"choice": "y", "strength": 0.5}


def test_reroutes_are_followed_notes_dropped_primitives_inlined():
    wf = {"nodes": [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [{"name": "", "type": "MODEL", "links": [2]}]},
        {"id": 3, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 2}],
         "outputs": [{"name": "", "type": "MODEL", "links": [3]}]},
        {"id": 4, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["read me"]},
        {"id": 5, "type": "MarkdownNote", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["# read me"]},
        {"id": 6, "type": "PrimitiveNode", "mode": 0, "inputs": [], "widgets_values": [1234, "fixed"],
         "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "seed"}, "links": [4]}]},
        _node(7, "KSampler", [1, "fixed", 2, 7.5, "ddim", "karras", 1.0],
              [("model", "MODEL", 3, False), ("seed", "INT", 4, True)]),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "*"], [3, 3, 0, 7, 0, "MODEL"], [4, 6, 0, 7, 1, "INT"]]}
    api = convert(wf, INFO)
    assert set(api) == {"1", "7"}
    assert api["7"]["inputs"]["model"] == ["1", 0]
    assert api["7"]["inputs"]["seed"] == 1234
    assert api["7"]["inputs"]["sampler_name"] == "ddim"


def test_bypassed_nodes_pass_through_and_muted_nodes_drop_out():
    wf = {"nodes": [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
        _node(2, "Trainer", [1, "fixed", True, "a", 0], [("model", "MODEL", 1, False)], mode=4),
        _node(3, "KSampler", [1, "fixed", 2, 7.5, "euler", "normal", 1.0], [("model", "MODEL", 2, False)]),
        _node(4, "Trainer", [1, "fixed", True, "a", 0], [("model", "MODEL", 3, False)], mode=2),
        _node(5, "KSampler", [1, "fixed", 2, 7.5, "euler", "normal", 1.0], [("model", "MODEL", 4, False)]),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 1, 0, 4, 0, "MODEL"], [4, 4, 0, 5, 0, "MODEL"]]}
    api = convert(wf, INFO)
    assert set(api) == {"1", "3", "5"}
    assert api["3"]["inputs"]["model"] == ["1", 0]       # through the bypassed node
    assert "model" not in api["5"]["inputs"]              # its source is muted


def _subgraph(sid: str, nodes: list, links: list, inputs: list[str], outputs: list[str]) -> dict:
    """A subgraph definition as the frontend saves it (links as objects; -10 / -20 the I/O nodes)."""
    return {"id": sid, "name": sid, "nodes": nodes,
            "links": [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
                      for link in links],
            "inputs": [{"name": t.lower(), "type": t} for t in inputs],
            "outputs": [{"name": t.lower(), "type": t} for t in outputs]}


def _instance(nid: int, sid: str, links: list, mode: int = 0, widget: bool = False) -> dict:
    return {"id": nid, "type": sid, "mode": mode, "widgets_values": [],
            "inputs": [{"name": "model", "type": "MODEL", "link": link, **({"widget": {"name": "model"}} if widget else {})}
                       for link in links],
            "outputs": [{"name": "model", "type": "MODEL", "links": []}]}


# "tune": MODEL -> Trainer -> MODEL. "twice": MODEL -> tune -> tune -> MODEL (nested instances).
TUNE = _subgraph("tune-id", [_node(2, "Trainer", [5, "fixed", True, "a", 0], [("model", "MODEL", 1, False)])],
                 [[1, -10, 0, 2, 0, "MODEL"], [2, 2, 0, -20, 0, "MODEL"]], ["MODEL"], ["MODEL"])
TWICE = _subgraph("twice-id", [_instance(3, "tune-id", [1]), _instance(4, "tune-id", [2])],
                  [[1, -10, 0, 3, 0, "MODEL"], [2, 3, 0, 4, 0, "MODEL"], [3, 4, 0, -20, 0, "MODEL"]], ["MODEL"], ["MODEL"])


def test_subgraphs_are_flattened_with_the_frontends_ids():
    """Each instance runs its own copy of the inner nodes, named "<instance>:<inner id>" (nested:
    the whole instance path); links cross the subgraph's input and output nodes."""
    wf = {"nodes": [_node(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
                    _instance(50, "tune-id", [1]), _instance(60, "twice-id", [2]),
                    _node(7, "KSampler", [1, "fixed", 2, 7.5, "euler", "normal", 1.0], [("model", "MODEL", 3, False)]),
                    _node(8, "KSampler", [1, "fixed", 2, 7.5, "euler", "normal", 1.0], [("model", "MODEL", 4, False)])],
          "links": [[1, 1, 0, 50, 0, "MODEL"], [2, 50, 0, 60, 0, "MODEL"], [3, 50, 0, 7, 0, "MODEL"],
                    [4, 60, 0, 8, 0, "MODEL"]],
          "definitions": {"subgraphs": [TUNE, TWICE]}}
    api = convert(wf, INFO)
    assert set(api) == {"1", "50:2", "60:3:2", "60:4:2", "7", "8"}
    assert api["50:2"]["inputs"] == {"seed": 5, "flag": True, "mode": "a", "noise_seed": 0, "model": ["1", 0]}
    assert api["60:3:2"]["inputs"]["model"] == ["50:2", 0]     # into a nested instance, from a sibling's output
    assert api["60:4:2"]["inputs"]["model"] == ["60:3:2", 0]   # between two nested instances
    assert api["7"]["inputs"]["model"] == ["50:2", 0]
    assert api["8"]["inputs"]["model"] == ["60:4:2", 0]        # out of a nested instance


def test_bypassed_and_muted_subgraphs_and_promoted_widgets():
    wf = {"nodes": [_node(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
                    _instance(50, "tune-id", [1], mode=4), _instance(60, "tune-id", [1], mode=2),
                    _node(7, "KSampler", [1, "fixed", 2, 7.5, "euler", "normal", 1.0], [("model", "MODEL", 3, False)]),
                    _node(8, "KSampler", [1, "fixed", 2, 7.5, "euler", "normal", 1.0], [("model", "MODEL", 4, False)])],
          "links": [[1, 1, 0, 50, 0, "MODEL"], [2, 1, 0, 60, 0, "MODEL"], [3, 50, 0, 7, 0, "MODEL"],
                    [4, 60, 0, 8, 0, "MODEL"]],
          "definitions": {"subgraphs": [TUNE]}}
    api = convert(wf, INFO)
    assert set(api) == {"1", "7", "8"}                    # neither instance runs its inner node
    assert api["7"]["inputs"]["model"] == ["1", 0]        # through the bypassed instance
    assert "model" not in api["8"]["inputs"]              # its source is muted
    promoted = {"nodes": [_instance(50, "tune-id", [None], widget=True),
                          _node(7, "KSampler", [1, "fixed", 2, 7.5, "euler", "normal", 1.0], [("model", "MODEL", 1, False)])],
                "links": [[1, 50, 0, 7, 0, "MODEL"]], "definitions": {"subgraphs": [TUNE]}}
    with pytest.raises(WorkflowConversionError, match="promoted widget 'model'"):
        convert(promoted, INFO)


def test_a_primitive_node_feeding_a_subgraph_is_refused():
    """Frontend 1.32.9 does not pass a PrimitiveNode's value into a subgraph (the inner samplers
    keep their own seed): converting such a graph would run what the user does not see."""
    wf = {**_chains_workflow(), "last_node_id": 10, "last_link_id": 10}
    wf["nodes"].append({"id": 10, "type": "PrimitiveNode", "mode": 0, "inputs": [], "widgets_values": [7, "fixed"],
                        "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "seed"}, "links": [9, 10]}]})
    for link, trainer in ((9, 2), (10, 4)):
        wf["links"].append([link, 10, 0, trainer, 1, "INT"])
        next(n for n in wf["nodes"] if n["id"] == trainer)["inputs"].append(
            {"name": "seed", "type": "INT", "link": link, "widget": {"name": "seed"}})
    assert {convert(wf, INFO)[k]["inputs"]["seed"] for k in ("2", "4")} == {7}  # flat: the primitive's value
    folded = fold(wf, [[2, 3], [4, 5]], "train and sample")
    with pytest.raises(WorkflowConversionError, match="input 'seed' comes from a PrimitiveNode"):
        convert(folded, INFO)


def _chains_workflow(seed_b: int = 1) -> dict:
    """A checkpoint, two copies of train -> sample (each sampling from its own checkpoint) and
    a consumer of each copy's sample."""
    def sampler(nid: int, seed: int, links: tuple[int, int]) -> dict:
        return _node(nid, "KSampler", [seed, "fixed", 2, 7.5, "euler", "normal", 1.0],
                     [("model", "MODEL", links[0], False), ("positive", "CONDITIONING", links[1], False)])

    return {"last_node_id": 9, "last_link_id": 8, "nodes": [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
        _node(8, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
        _node(9, "CheckpointLoaderSimple", ["a.safetensors"], outputs=3),
        _node(2, "Trainer", [5, "fixed", True, "a", 0], [("model", "MODEL", 1, False)]), sampler(3, 1, (2, 3)),
        _node(4, "Trainer", [5, "fixed", True, "a", 0], [("model", "MODEL", 4, False)]), sampler(5, seed_b, (5, 6)),
        _node(6, "Trainer", [5, "fixed", True, "a", 0], [("model", "MODEL", 7, False)]),
        _node(7, "Trainer", [5, "fixed", True, "a", 0], [("model", "MODEL", 8, False)])],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 8, 1, 3, 1, "CONDITIONING"],
                  [4, 1, 0, 4, 0, "MODEL"], [5, 4, 0, 5, 0, "MODEL"], [6, 9, 1, 5, 1, "CONDITIONING"],
                  [7, 3, 0, 6, 0, "MODEL"], [8, 5, 0, 7, 0, "MODEL"]]}


def _unfolded_ids(instances: list[int], groups: list[list[int]]) -> dict[str, str]:
    """API id of each node inside an instance ("70:11") -> its id in the unfolded workflow: the
    k-th instance runs the k-th copy (its inner ids are the first copy's)."""
    return {f"{inst}:{inner}": str(orig) for inst, group in zip(instances, groups)
            for inner, orig in zip(groups[0], group)}


def _renamed(api: dict, names: dict[str, str]) -> dict:
    """The prompt under the unfolded ids, without titles (what the server runs)."""
    return {names.get(k, k): {"class_type": v["class_type"], "inputs": {
        n: [names.get(x[0], x[0]), x[1]] if isinstance(x, list) else x for n, x in v["inputs"].items()}}
        for k, v in api.items()}


def test_folding_repeated_chains_into_a_subgraph_keeps_the_prompt():
    """Folded, each copy is an instance of one subgraph; the frontend's flattening gives the
    unfolded workflow's prompt back, under the instances' ids."""
    wf = _chains_workflow()
    folded = fold(wf, [[2, 3], [4, 5]], "train and sample", inner_title=str.upper)
    (sub,) = folded["definitions"]["subgraphs"]
    assert [i["name"] for i in sub["inputs"]] == ["model", "positive"] and len(sub["outputs"]) == 1
    instances = [n["id"] for n in folded["nodes"] if n["type"] == sub["id"]]
    assert len(instances) == 2 and len(folded["nodes"]) == len(wf["nodes"]) - 2
    names = _unfolded_ids(instances, [[2, 3], [4, 5]])
    assert _renamed(convert(folded, INFO), names) == _renamed(convert(wf, INFO), {})
    with pytest.raises(FoldError, match="node 5 \\(KSampler\\) is not a copy of node 3"):
        fold(_chains_workflow(seed_b=2), [[2, 3], [4, 5]], "train and sample")


def test_widget_count_mismatch_is_an_error_naming_the_node():
    wf = {"nodes": [_node(9, "KSampler", [1, 2, 7.5, "euler", "normal", 1.0])], "links": []}  # no control value
    with pytest.raises(WorkflowConversionError, match="node 9 \\(KSampler\\)"):
        convert(wf, INFO)
    assert convert(wf, INFO, strict=False)["9"]["inputs"]["seed"] == 1
    with pytest.raises(WorkflowConversionError, match="UnknownNode"):
        convert({"nodes": [_node(1, "UnknownNode")], "links": []}, INFO)


def test_overrides_replace_literals_only():
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
           "2": {"class_type": "KSampler", "inputs": {"steps": 30, "model": ["1", 0]}},
           "3": {"class_type": "LipschitzPersonalize", "inputs": {"steps": 1000, "model": ["1", 0]}}}
    out = apply_overrides(api, small_run_overrides("tiny.safetensors", train_steps=3))
    assert out["1"]["inputs"]["ckpt_name"] == "tiny.safetensors"
    assert out["2"]["inputs"] == {"steps": 2, "model": ["1", 0]}
    assert out["3"]["inputs"] == {"steps": 3, "resolution": 64, "model": ["1", 0]}
    latents = {"4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 8}},
               "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}}}
    small = apply_overrides(latents, small_run_overrides(sample_resolution=32, max_batch=2))
    assert small["4"]["inputs"] == {"width": 32, "height": 32, "batch_size": 2}
    assert small["5"]["inputs"]["batch_size"] == 1
    assert api["2"]["inputs"]["steps"] == 30  # the input is not modified
    assert apply_overrides(api, {"KSampler": {"model": "x"}})["2"]["inputs"]["model"] == ["1", 0]


# --------------------------------------------------------------------------------------------
# grid node units


def test_grid_validates_label_counts_and_names_the_input():
    rows = [torch.rand(3, 32, 32, 3), torch.rand(3, 32, 32, 3)]
    with pytest.raises(ValueError, match="row_labels: 3 label\\(s\\) for 2 row"):
        grid.make_grid(rows, ["a", "b", "c"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="column_labels: 2 label\\(s\\) for 3 column"):
        grid.make_grid(rows, ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="row_labels: 2 label\\(s\\) for 1 row"):
        grid.make_grid(rows[:1], grid.parse_labels("a\nb\n"), [])


def test_grid_layout_resizes_rows_and_draws_labels_on_white():
    first, second = torch.zeros(2, 64, 48, 3), torch.ones(2, 32, 32, 4)  # other size, RGBA
    out = grid.make_grid([first, second], grid.parse_labels("lambda 0\nlambda 500\n"),
                         grid.parse_labels("cat\n\ndog"), "title")
    assert out.dtype == torch.float32 and out.shape[0] == 1 and out.shape[-1] == 3
    _, h, w, _ = out.shape
    assert w > 2 * 48 and h > 2 * 64                            # label strips around 2x2 cells of 64x48
    img = out[0].numpy()
    assert img[0, 0].tolist() == [1.0, 1.0, 1.0]                 # white background
    assert (img[-64:, -48:] == 1.0).all()                        # second row resized to the first's cells
    assert (img[-128:-64, -48:] == 0.0).all()
    assert (img[:h - 128] < 0.5).any()                           # some text was drawn above the cells
    bare = grid.make_grid([first], [], [])                       # no labels: just the cells
    assert tuple(bare.shape) == (1, 64, 96, 3)


# --------------------------------------------------------------------------------------------
# shipped workflows on a real server


@pytest.fixture(scope="module")
def server(comfy_server):
    install_subject(comfy_server.input_dir)
    stand_in(comfy_server.base_dir / "models" / "eval", ensure(EVAL_DIR))
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.client.object_info()


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _small(api: dict) -> dict:
    return apply_overrides(api, small_run_overrides(CKPT, train_steps=2, resolution=RES, sample_steps=1,
                                                     sample_resolution=SAMPLE_RES, max_batch=2))


def _run_ok(server, api: dict):
    result = server.client.run(api, timeout=600)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    return result


def _image_path(server, img: dict) -> Path:
    folder = server.output_dir if img.get("type", "output") == "output" else server.base_dir / img["type"]
    return folder / img.get("subfolder", "") / img["filename"]


def _check_outputs(server, api: dict, object_info: dict, result) -> None:
    """Every output node of ``api`` wrote what it should."""
    outs = output_nodes(api, object_info)
    assert outs, "a workflow without output nodes does nothing"
    for nid in outs:
        node = api[nid]
        if node["class_type"] == "CheckpointSave":  # writes a file, reports nothing to the UI
            prefix = Path(node["inputs"]["filename_prefix"])
            files = list((server.output_dir / prefix.parent).glob(prefix.name + "*.safetensors"))
            assert files, f"CheckpointSave {nid} wrote no {prefix}*.safetensors"
            continue
        ui = result.outputs.get(nid)
        assert ui, f"output node {nid} ({node['class_type']}) produced nothing"
        assert ui.get("images") or ui.get("text"), ui
        for img in ui.get("images") or []:
            path = _image_path(server, img)
            assert path.is_file(), path
            with Image.open(path) as im:
                size = im.size
            src = node["inputs"].get("images")
            if isinstance(src, list) and api[src[0]]["class_type"] == "LipschitzLabeledGrid":
                g = api[src[0]]["inputs"]
                rows = sum(1 for k, v in g.items() if k.startswith("images_") and isinstance(v, list))
                cols = len(grid.parse_labels(g["column_labels"]))
                assert size[0] > cols * SAMPLE_RES and size[1] > rows * SAMPLE_RES, (size, rows, cols)
        if node["class_type"] == "LipschitzMetricsTable":
            header, body = _table(ui["text"][0])
            labels = grid.parse_labels(node["inputs"]["row_labels"])
            assert [r[0] for r in body] == labels, (body, labels)
            assert all(np.isfinite(float(c)) for r in body for c in r[1:]), body  # every row has every column


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table a Metrics Table node printed."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return rows[0], rows[2:]


def test_workflow_templates_route_lists_the_shipped_files(server):
    listed = server.client.get("/workflow_templates")
    assert sorted(listed[PACK_DIR_NAME]) == sorted(p.stem for p in WORKFLOWS)
    served = server.client.get(f"/api/workflow_templates/{PACK_DIR_NAME}/compare_lambda.json")
    assert served == _load(REPO / "workflows" / "compare_lambda.json")


def _link_rows(graph: dict) -> list[tuple]:
    """(id, origin, origin slot, target, target slot, type) of a graph's links, either format."""
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return [tuple(link[k] for k in keys) if isinstance(link, dict) else tuple(link) for link in graph["links"]]


def _check_links(graph: dict, where: str) -> None:
    """The link table and the nodes' slots agree (a subgraph's links may start at its input
    node, -10, and end at its output node, -20)."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert len(nodes) == len(graph["nodes"]), where
    for link_id, src, src_slot, dst, dst_slot, typ in _link_rows(graph):
        if src != SUBGRAPH_INPUT:
            out = nodes[src]["outputs"][src_slot]
            assert link_id in out["links"] and out["type"] == typ, (where, link_id, out)
        if dst != SUBGRAPH_OUTPUT:
            inp = nodes[dst]["inputs"][dst_slot]
            assert inp["link"] == link_id and inp["type"] in (typ, "*"), (where, link_id, inp)
    ids = {row[0] for row in _link_rows(graph)}
    for n in graph["nodes"]:
        assert all(inp["link"] is None or inp["link"] in ids for inp in n["inputs"]), (where, n["id"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_is_well_formed(path, object_info):
    """What the frontend relies on: link tables and slots agree at the top level and inside each
    subgraph, known node types, a Note."""
    wf = _load(path)
    assert wf["version"] == 0.4 and isinstance(wf["groups"], list)
    subgraphs = {sg["id"]: sg for sg in (wf.get("definitions") or {}).get("subgraphs") or []}
    assert wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    _check_links(wf, path.stem)
    for sg in subgraphs.values():
        _check_links(sg, f"{path.stem}/{sg['name']}")
        assert all(port["linkIds"] for port in sg["inputs"] + sg["outputs"]), sg["name"]
    every = wf["nodes"] + [n for sg in subgraphs.values() for n in sg["nodes"]]
    for n in every:
        assert {"id", "type", "pos", "size", "mode", "inputs", "outputs", "properties"} <= set(n), n["id"]
        assert n["type"] in object_info or n["type"] in subgraphs or n["type"] in ("Note", "PrimitiveNode"), n["type"]
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert notes and all(w in notes[0] for w in ("sks", "input/dog", "v1-5-pruned-emaonly.safetensors"))
    for n in every:
        if n["type"] == "LipschitzEvalModelLoader":  # the Note says where that model goes
            assert f"models/eval/{n['widgets_values'][0]}/" in notes[0], n["widgets_values"]
    ckpts = [n["widgets_values"][0] for n in every if n["type"] == "CheckpointLoaderSimple"]
    assert ckpts == ["v1-5-pruned-emaonly.safetensors"]
    for n in every:
        if n["type"] == "LipschitzPersonalize":
            api = widget_inputs(n, object_info["LipschitzPersonalize"])
            assert (api["steps"], api["learning_rate"], api["seed"], api["resolution"]) == (1000, 2e-6, 2025, 512)


@pytest.mark.parametrize("stem", sorted(fold_workflows.SPECS))
def test_folded_workflow_runs_exactly_its_flat_sources_prompt(stem, object_info):
    """A folded shipped file is what ``tools/fold_workflows.py`` writes from its flat source, and
    the server runs the same prompt from either: the same nodes, values and links, the nodes
    inside the k-th instance standing for the k-th copy of the chain."""
    shipped = _load(REPO / "workflows" / f"{stem}.json")
    assert (REPO / "workflows" / f"{stem}.json").read_text() == fold_workflows.render(fold_workflows.build(stem)), \
        f"workflows/{stem}.json is not up to date: run python tools/fold_workflows.py"
    spec = fold_workflows.SPECS[stem]
    by_title = {n.get("title"): n["id"] for n in shipped["nodes"]}
    names = _unfolded_ids([by_title[t] for t in spec.titles], spec.groups)
    source = convert(_load(fold_workflows.SOURCES / f"{stem}.json"), object_info)
    folded = _renamed(convert(shipped, object_info), names)
    assert set(folded) == set(source) and len(source) > len(shipped["nodes"])  # the fold hides nodes, drops none
    assert folded == _renamed(source, {})


_RUNS: dict[str, tuple[dict, object]] = {}


def _run_shipped(server, object_info, path: Path):
    """Convert, shrink and run one shipped file (once per module: later tests read the result)."""
    if path.stem not in _RUNS:
        api = _small(convert(_load(path), object_info))
        _RUNS[path.stem] = api, _run_ok(server, api)
    return _RUNS[path.stem]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_runs_on_the_server(server, object_info, path):
    api, result = _run_shipped(server, object_info, path)
    _check_outputs(server, api, object_info, result)
    # Each fine-tune trained (or loaded a finished run from disk) to the end, or was cached.
    for nid, n in api.items():
        if n["class_type"] != "LipschitzPersonalize":
            continue
        bar = [m["data"] for m in result.messages if m.get("type") == "progress" and m["data"].get("node") == nid]
        assert nid in result.cached_nodes or (bar and bar[-1]["value"] == bar[-1]["max"] == 2), (nid, bar)


def test_export_step_two_reapplies_the_saved_delta(server, object_info):
    """personalize_and_export: run step 1 as shipped, then do what its Note says (pick the saved
    delta in Apply Lipschitz Delta, unmute step 2) and run again."""
    wf = _load(REPO / "workflows" / "personalize_and_export.json")
    step1 = _small(convert(wf, object_info))
    assert "LipschitzApplyDelta" not in {n["class_type"] for n in step1.values()}  # muted as shipped
    first = _run_ok(server, step1)
    save_id = next(nid for nid, n in step1.items() if n["class_type"] == "LipschitzSaveDelta")
    saved = first.outputs[save_id]["text"][0].split("/")[-1]
    assert (server.base_dir / "models" / "lipschitz_deltas" / saved).is_file()

    for n in wf["nodes"]:
        if n["mode"] == 2:
            n["mode"] = 0
        if n["type"] == "LipschitzApplyDelta":
            n["widgets_values"][0] = saved
    step2 = _small(convert(wf, object_info))
    assert "LipschitzApplyDelta" in {n["class_type"] for n in step2.values()}
    second = _run_ok(server, step2)
    _check_outputs(server, step2, object_info, second)
    previews = {n["_meta"]["title"]: nid for nid, n in step2.items() if n["class_type"] == "SaveImage"}
    trained = np.asarray(Image.open(_image_path(server, second.outputs[previews["preview: trained model"]]["images"][0])), dtype=np.int16)
    reapplied = np.asarray(Image.open(_image_path(server, second.outputs[previews["preview: re-applied delta"]]["images"][0])), dtype=np.int16)
    assert trained.shape == reapplied.shape and np.abs(trained - reapplied).max() <= 2


@pytest.mark.parametrize("name, columns", [
    ("compare_lambda", ["DINO", "CLIP-I", "CLIP-T", "drift cosine", "drift Frechet", "drift KID"]),
    ("dreambooth_vs_lipschitz", ["DINO", "CLIP-I", "CLIP-T", "drift cosine", "drift Frechet", "drift KID"]),
    ("drift_check", ["drift cosine", "drift Frechet", "drift KID"]),
])
def test_metric_tables_of_the_shipped_workflows(server, object_info, name, columns):
    """What a user reads: one row per model with the paper's numbers and the encoders named
    (and flagged as tiny random stand-ins here)."""
    api, result = _run_shipped(server, object_info, REPO / "workflows" / f"{name}.json")
    table_id = next(nid for nid, n in api.items() if n["class_type"] == "LipschitzMetricsTable")
    text = result.outputs[table_id]["text"][0]
    header, body = _table(text)
    assert header == ["model", *columns], header
    trained = [n for n in api.values() if n["class_type"] == "LipschitzPersonalize"]
    assert len(body) == len(trained)
    assert "CLIP ViT (hidden 64, patch 8, 32 px)" in text and "tiny random stand-in encoders" in text
    assert "```csv\n" + ",".join(header) in text
    for row in body:  # drift is measured against the base model: cosine in [-1, 1], distances >= 0
        values = dict(zip(header[1:], map(float, row[1:])))
        assert -1.0 <= values["drift cosine"] <= 1.0 + 1e-6 and values["drift Frechet"] >= 0, row


def test_microworld_demo_workflow_converts_with_the_worlds_schedule(object_info):
    """`make demo`'s default workflow (tools/microworld/) converts against the live node list and
    trains with the schedule the micro-world's tests and sweep measured."""
    from tools.microworld import protocol
    api = convert(_load(REPO / "tools" / "microworld" / "compare_lambda_microworld.json"), object_info)
    trains = [n["inputs"] for n in api.values() if n["class_type"] == "LipschitzPersonalize"]
    assert sorted(t["lambda_reg"] for t in trains) == [0, 500, 2000, 10000]
    assert {(t["steps"], t["learning_rate"], t["resolution"]) for t in trains} == {(protocol.STEPS, protocol.LR, protocol.RES)}
