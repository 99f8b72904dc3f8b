"""The pack on a real ComfyUI server (main.py --cpu), driven over HTTP and websocket."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tools.graphs import CKPT, DATA, install_subject, personalize_graph, sample

NODE_IDS = {"LipschitzLoadReferenceImages", "LipschitzPersonalize", "LipschitzSaveDelta",
            "LipschitzApplyDelta", "LipschitzTrainingReport"}


@pytest.fixture(scope="module")
def server(comfy_server):
    install_subject(comfy_server.input_dir)
    return comfy_server


def _pixels(server, result, node_id) -> np.ndarray:
    """The single image a SaveImage node wrote, as an array."""
    images = result.outputs[node_id]["images"]
    assert len(images) == 1
    info = images[0]
    return np.asarray(Image.open(server.output_dir / info.get("subfolder", "") / info["filename"]))


def _unet(tensors: dict) -> dict:
    return {k[len("model.diffusion_model."):]: v.float() for k, v in tensors.items() if k.startswith("model.diffusion_model.")}


def _run_ok(client, graph, timeout=600):
    result = client.run(graph, timeout=timeout)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    return result


def test_nodes_are_registered_with_their_public_inputs(server):
    info = server.client.object_info()
    assert NODE_IDS <= set(info)
    p = info["LipschitzPersonalize"]["input"]
    assert {"model", "clip", "vae", "images", "prompt", "lambda_reg", "steps", "learning_rate", "seed"} <= set(p["required"])
    assert {"regularizer", "precision", "gradient_checkpointing", "batch_size", "resolution",
            "class_images", "class_prompt", "prior_weight", "resume"} <= set(p["optional"])
    assert p["required"]["lambda_reg"][1]["default"] == 500.0 and p["required"]["lambda_reg"][1]["min"] == 0
    assert p["required"]["steps"][1]["default"] == 1000
    assert p["required"]["learning_rate"][1]["default"] == 2e-6
    assert p["required"]["seed"][1]["default"] == 2025
    assert p["required"]["seed"][1]["control_after_generate"] is False  # fixed: re-queues reuse the run
    assert p["optional"]["precision"][1]["default"] == "fp32"
    assert info["LipschitzPersonalize"]["output"] == ["MODEL", "DELTA", "TRAINING_LOG"]
    assert info["LipschitzLoadReferenceImages"]["input"]["required"]["crop"][1]["default"] == "center"


def test_full_graph_trains_samples_saves_and_leaves_the_base_alone(server):
    client = server.client
    graph = personalize_graph("full", steps=5, seed=11)
    sample(graph, ["train", 0], "full_tuned")
    sample(graph, ["ckpt", 0], "full_base")
    graph["save_delta"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1], "filename_prefix": "full"}}
    graph["report"] = {"class_type": "LipschitzTrainingReport", "inputs": {"log_1": ["train", 2]}}
    graph["report_save"] = {"class_type": "SaveImage", "inputs": {"images": ["report", 0], "filename_prefix": "full_report"}}
    graph["merge"] = {"class_type": "CheckpointSave", "inputs": {"model": ["train", 0], "clip": ["ckpt", 1],
                                                                  "vae": ["ckpt", 2], "filename_prefix": "checkpoints/full_merged"}}
    result = _run_ok(client, graph)

    # One websocket event and one progress update per step, for our node.
    events = result.events("lipschitz.progress")
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["total"] == 5 and e["lambda"] == 500.0 and e["delta_norm"] > 0 for e in events)
    bar = [m["data"] for m in result.messages if m["type"] == "progress" and m["data"].get("node") == "train"]
    assert bar and bar[-1]["value"] == 5

    tuned, base = _pixels(server, result, "full_tuned_save"), _pixels(server, result, "full_base_save")
    assert tuned.shape == (64, 64, 3) and not np.array_equal(tuned, base)
    assert _pixels(server, result, "report_save").shape[0] > 200

    # The merged checkpoint is base + delta; the base checkpoint's U-Net is untouched.
    delta_path = server.base_dir / "models" / "lipschitz_deltas" / result.outputs["save_delta"]["text"][0].split("/")[-1]
    delta = load_file(delta_path)
    merged = _unet(load_file(next((server.output_dir / "checkpoints").glob("full_merged*.safetensors"))))
    original = _unet(load_file(server.checkpoints_dir / CKPT))
    key = "input_blocks.0.0.weight"
    stored = delta[f"diffusion_model.{key[:-7]}.diff"]
    assert stored.dtype == torch.float16  # the default delta_dtype: half the size of fp32
    torch.testing.assert_close(merged[key].float(), original[key].float() + stored.float(), rtol=0, atol=1e-6)

    # The MODEL every other node holds: saved after training it equals the file, bit for bit.
    check = {"ckpt": graph["ckpt"], "save": {"class_type": "CheckpointSave", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "filename_prefix": "checkpoints/base_after"}}}
    _run_ok(client, check)
    after = _unet(load_file(next((server.output_dir / "checkpoints").glob("base_after*.safetensors"))))
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original)


def test_requeue_is_cached_and_restart_reloads_the_delta_from_disk(server):
    client = server.client
    graph = personalize_graph("cache", steps=3, seed=12)
    sample(graph, ["train", 0], "cache_tuned")
    first = _run_ok(client, graph)
    assert len(first.events("lipschitz.progress")) == 3
    again = _run_ok(client, graph)
    assert "train" in again.cached_nodes and not again.events("lipschitz.progress")

    server.restart()
    reloaded = _run_ok(client := server.client, graph)
    assert "train" not in reloaded.cached_nodes
    assert not reloaded.events("lipschitz.progress"), "a finished run must not be retrained"
    assert np.array_equal(_pixels(server, first, "cache_tuned_save"), _pixels(server, reloaded, "cache_tuned_save"))


def test_saved_delta_reapplied_by_our_node_and_by_stock_lora_loader_gives_the_same_sample(server):
    client = server.client
    graph = personalize_graph("apply", steps=3, seed=13)
    sample(graph, ["train", 0], "apply_tuned")
    graph["save_delta"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1], "filename_prefix": "apply"}}
    trained = _run_ok(client, graph)
    name = trained.outputs["save_delta"]["text"][0].split("/")[-1]
    server.restart()  # the file list of the Apply node's combo is read at start
    client = server.client
    (server.base_dir / "models" / "loras").mkdir(parents=True, exist_ok=True)
    lora = server.base_dir / "models" / "loras" / name
    lora.symlink_to(server.base_dir / "models" / "lipschitz_deltas" / name)

    graph2 = {"ckpt": graph["ckpt"],
              "ours": {"class_type": "LipschitzApplyDelta", "inputs": {"model": ["ckpt", 0], "delta_file": name, "strength": 1.0}},
              "stock": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0], "lora_name": name, "strength_model": 1.0}}}
    sample(graph2, ["ours", 0], "apply_ours")
    sample(graph2, ["stock", 0], "apply_stock")
    applied = _run_ok(client, graph2)
    reference = _pixels(server, trained, "apply_tuned_save")
    assert np.array_equal(_pixels(server, applied, "apply_ours_save"), reference)
    assert np.array_equal(_pixels(server, applied, "apply_stock_save"), reference)


def test_interrupt_stops_within_a_step_saves_the_partial_and_the_server_goes_on(server):
    client = server.client
    graph = personalize_graph("interrupt", steps=5000, seed=14)
    sample(graph, ["train", 0], "interrupt_tuned")
    seen: list[int] = []

    def on_message(msg):
        if msg.get("type") == "lipschitz.progress":
            seen.append(msg["data"]["step"])
            if len(seen) == 3:
                client.interrupt()

    result = client.run(graph, timeout=600, on_message=on_message)
    assert result.status == "interrupted"
    assert max(seen) <= 5, "training went on after the interrupt"
    partials = list((server.base_dir / "models" / "lipschitz_deltas").glob("partial_*.safetensors"))
    assert partials
    from lipschitz_personalize.trainer.persist import read_metadata
    meta = read_metadata(max(partials, key=lambda p: p.stat().st_mtime))
    assert meta["status"] == "interrupted" and 3 <= int(meta["steps_done"]) <= 5
    _run_ok(client, sample(personalize_graph("after", steps=2, seed=15), ["train", 0], "after_tuned"))


def test_non_sd15_model_is_refused_before_training(server, tiny_sdxl_ckpt):
    link = server.checkpoints_dir / "tiny_sdxl.safetensors"
    if not link.exists():
        link.symlink_to(tiny_sdxl_ckpt)
    graph = personalize_graph("sdxl", steps=3)
    graph["ckpt"]["inputs"]["ckpt_name"] = "tiny_sdxl.safetensors"
    graph["merge"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1], "filename_prefix": "sdxl"}}
    result = server.client.run(graph, timeout=600)
    assert result.status == "error"
    assert "model:" in result.error["exception_message"] and "SD1.5" in result.error["exception_message"]
    assert not result.events("lipschitz.progress")


def test_stock_load_image_feeds_the_trainer_and_the_base_still_samples_the_base(server):
    client = server.client
    shutil.copy(DATA / "dog" / "00.jpg", server.input_dir / "stock_dog.jpg")  # 512x512, resized by the node
    base_only = sample({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}},
                       ["ckpt", 0], "stock_reference", seed=21)
    reference = _pixels(server, _run_ok(client, base_only), "stock_reference_save")

    graph = personalize_graph("stock", steps=2, seed=16)
    graph["refs"] = {"class_type": "LoadImage", "inputs": {"image": "stock_dog.jpg"}}
    sample(graph, ["train", 0], "stock_tuned", seed=21)
    sample(graph, ["ckpt", 0], "stock_base", seed=21)
    result = _run_ok(client, graph)
    assert len(result.events("lipschitz.progress")) == 2
    assert np.array_equal(_pixels(server, result, "stock_base_save"), reference)
    assert not np.array_equal(_pixels(server, result, "stock_tuned_save"), reference)


def test_lean_cancelled_at_random_times_resumes_bitwise_to_the_uninterrupted_run(server):
    """``lean`` steps Adam inside backward, and ComfyUI checks for an interrupt inside every op,
    also during the checkpoint recompute in backward: wherever the Cancel lands, the saved
    partial run must be the last completed step, so that resuming gives the uninterrupted
    run's delta bit for bit (fp32 delta: nothing is rounded on the way)."""
    import random
    import threading

    client, deltas = server.client, server.base_dir / "models" / "lipschitz_deltas"
    inputs = {"steps": 8, "seed": 31, "memory": "lean", "delta_dtype": "fp32", "resolution": 128}

    def finished(resume: bool, on_message=None) -> dict:
        client.post("/free", {"free_memory": True})  # ComfyUI must not serve the last run from its cache
        graph = personalize_graph("cancel", resume=resume, **inputs)
        graph["report"] = {"class_type": "LipschitzTrainingReport", "inputs": {"log_1": ["train", 2]}}
        graph["show"] = {"class_type": "PreviewImage", "inputs": {"images": ["report", 0]}}
        return client.run(graph, timeout=600, on_message=on_message)

    others = set(deltas.glob("auto_*.safetensors"))  # the module's other tests' runs

    def take_auto() -> dict:
        (auto,) = set(deltas.glob("auto_*.safetensors")) - others
        tensors = load_file(auto)
        auto.unlink()  # the next run must train, not reload this one
        return tensors

    pick = random.SystemRandom()
    stopped_at: list[float] = []
    results: list[dict] = []

    def cancel_soon(msg) -> None:
        if msg.get("type") == "lipschitz.progress" and len(stopped_at) < len(results) + 1:
            delay = pick.uniform(0.2, 1.5)  # somewhere in the next steps: forward, backward or update
            stopped_at.append(delay)
            threading.Timer(delay, client.interrupt).start()

    for _ in range(3):
        assert finished(False, cancel_soon).status == "interrupted"
        assert list(deltas.glob("partial_*.safetensors")), "no partial run was saved"
        assert finished(True).status == "success"
        results.append(take_auto())
    assert finished(False).status == "success"
    reference = take_auto()
    for tensors in results:
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[k], reference[k]) for k in reference), f"cancelled after {stopped_at}"


def _saved(graph: dict) -> dict:
    """``graph`` with an output node (ComfyUI runs only what leads to one): the delta saved."""
    graph["save"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1], "filename_prefix": "preview"}}
    return graph


def _decoded(url: str) -> np.ndarray:
    """A preview's PNG data URL as a float array in [0, 1]."""
    import base64
    import io

    head, _, body = url.partition(",")
    assert head == "data:image/png;base64", head
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body))), dtype=np.float64) / 255.0


def test_previews_show_the_delta_beside_the_base_to_the_queuing_client_and_leave_the_delta_bitwise_alone(server):
    """Every ``preview_every`` steps the node samples the instance prompt and the token-less prompt
    from the current delta, beside the base's images (sampled once, at step 0); the drift is the
    pixel distance of the token-less image from the base's.  Only the queuing client receives
    them; the status route keeps them for a reload; and the trained delta is bitwise the one of
    the same run without previews."""
    import json
    import random

    import websocket

    client, deltas = server.client, server.base_dir / "models" / "lipschitz_deltas"
    others = set(deltas.glob("auto_*.safetensors"))
    seed = random.randrange(1, 2**31)  # a new run key: never served from a finished run on disk

    def trained(**preview) -> tuple[dict, object]:
        client.post("/free", {"free_memory": True})  # ComfyUI must not serve the last run from its cache
        result = _run_ok(client, _saved(personalize_graph("preview", steps=4, seed=seed, **preview)))
        (auto,) = set(deltas.glob("auto_*.safetensors")) - others
        tensors = load_file(auto)
        auto.unlink()  # the next run must train, not reload this one
        return tensors, result

    plain, _ = trained()
    bystander = websocket.create_connection(client.ws_url("bystander"), timeout=10)
    try:
        previewed, result = trained(preview_every=2, preview_steps=2, preview_size=64)
        bystander.settimeout(0.5)
        heard = []
        with pytest.raises(websocket.WebSocketTimeoutException):
            while True:
                frame = bystander.recv()
                if isinstance(frame, str):
                    heard.append(json.loads(frame).get("type"))
    finally:
        bystander.close()
    assert "lipschitz.preview" not in heard and "lipschitz.progress" not in heard, heard

    assert plain.keys() == previewed.keys()
    assert all(torch.equal(plain[k], previewed[k]) for k in plain), "the previews changed the trained delta"

    events = result.events("lipschitz.preview")
    assert [e["step"] for e in events] == [0, 2, 4]
    assert all(e["prompts"] == ["a photo of sks dog", "a photo of dog"] for e in events)
    base = [_decoded(u) for u in events[0]["base"]]
    assert [b.shape for b in base] == [(64, 64, 3)] * 2
    for e in events:
        images = [_decoded(u) for u in e["images"]]
        assert all(np.array_equal(_decoded(u), b) for u, b in zip(e["base"], base))
        # the drift is the token-less image's RMS distance from the base's (8-bit PNG rounding aside)
        assert abs(e["drift"] - np.sqrt(np.mean((images[1] - base[1]) ** 2))) <= 1 / 255
    assert events[0]["drift"] == 0.0 and all(np.array_equal(_decoded(u), b) for u, b in zip(events[0]["images"], base))
    assert events[-1]["drift"] > 0.0, "the trained delta drew the base's image"
    assert any(t.startswith("preview at step 4/4: drift") for t in result.texts_for("train"))

    stored = client.get("/lipschitz/status?node=train")["train"]["previews"]
    assert stored["step"] == 4 and stored["images"] == events[-1]["images"] and stored["base"] == events[0]["base"]
    assert stored["drift"] == [[e["step"], e["drift"]] for e in events]


def test_cancel_while_the_base_previews_are_sampled_ends_the_run_as_interrupted(server):
    """The interrupt is sent as the node says its memory plan, right before it samples the base
    model's previews (two prompts of 100 sampler steps: seconds on the tiny model): the run stops
    before step 1, saves nothing, and the chart's state (the status route a reload reads) is
    ``interrupted``, not a run that shows as running forever."""
    import random
    import threading

    client, deltas = server.client, server.base_dir / "models" / "lipschitz_deltas"
    graph = personalize_graph("base_cancel", steps=4, seed=random.randrange(1, 2**31), preview_every=2,
                              preview_steps=100, preview_size=128)
    seen: list[str] = []

    def on_message(msg):
        if msg["type"] == "progress_text" and msg["data"]["node"] == "train" and msg["data"]["text"].startswith("memory:"):
            threading.Timer(0.5, client.interrupt).start()
        seen.append(msg["type"])

    before = set(deltas.glob("*.safetensors"))
    result = client.run(_saved(graph), timeout=600, on_message=on_message)
    assert result.status == "interrupted"
    assert "lipschitz.progress" not in seen and "lipschitz.preview" not in seen, seen
    assert set(deltas.glob("*.safetensors")) == before
    assert client.get("/lipschitz/status?node=train")["train"]["state"] == "interrupted"


def test_cancel_during_a_preview_stops_it_and_saves_the_run_like_a_cancel_during_a_step(server):
    """The interrupt is sent a while after step 2's event, inside step 2's preview (a quarter of
    the time the base's preview and step 1 took, which the preview of step 2 takes again): it
    stops inside the sampler (no preview of step 2 is shown, step 3 never runs) and the run is
    saved at step 2 as a stopped run that ``resume`` continues."""
    import random
    import threading
    import time

    from lipschitz_personalize.trainer.persist import read_metadata

    client, deltas = server.client, server.base_dir / "models" / "lipschitz_deltas"
    graph = personalize_graph("preview_cancel", steps=6, seed=random.randrange(1, 2**31), preview_every=2,
                              preview_steps=20, preview_size=64)
    steps: list[int] = []
    base_shown: list[float] = []

    def on_message(msg):
        if msg.get("type") == "lipschitz.preview" and msg["data"]["step"] == 0:
            base_shown.append(time.monotonic())
        if msg.get("type") == "lipschitz.progress":
            steps.append(msg["data"]["step"])
            if msg["data"]["step"] == 1:
                base_shown.append(time.monotonic() - base_shown[0])
            if msg["data"]["step"] == 2:
                threading.Timer(base_shown[1] / 4, client.interrupt).start()

    before = set(deltas.glob("partial_*.safetensors"))
    result = client.run(_saved(graph), timeout=600, on_message=on_message)
    assert result.status == "interrupted"
    assert steps == [1, 2] and [e["step"] for e in result.events("lipschitz.preview")] == [0]
    (partial,) = set(deltas.glob("partial_*.safetensors")) - before
    meta = read_metadata(partial)
    assert meta["status"] == "interrupted" and meta["steps_done"] == "2"
