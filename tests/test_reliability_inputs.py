"""Bad inputs through a real ComfyUI server (main.py --cpu, tiny SD1.5 at 64 px).

Every refused input: the error names the input and says how to fix it, no training starts
(no progress event, no delta file), the base U-Net's hash is unchanged and the next prompt
runs.  Inputs that are allowed (1 image, odd image modes and sizes, a long prompt) train and
say what they did.  The server is this module's own, with the test-only fault pack linked in
for the hash (tests/fault_pack).
"""
from __future__ import annotations

import json
import shutil
import struct
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fault_pack.harness import (check_prompt, file_unet_hash, make_server, node_errors_text,
                                run_expect_error)
from tools.graphs import CKPT, DATA, RES, personalize_inputs
from tools.comfy_server import ComfyServerError
from lipschitz_personalize.trainer.persist import load_verified, save_verified

SDXL = "tiny_sdxl.safetensors"
LONG_PROMPT = "a photo of sks dog " + " ".join(["sitting on a red velvet sofa in a sunlit room"] * 12)
TRIED: list[str] = []  # every input tried, for the report printed at the end of the module


def _png16(path: Path, w: int, h: int) -> None:
    arr = (np.linspace(0, 65535, w * h).reshape(h, w)).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16"), img.mode
    img.save(path)


def _bomb_png(path: Path, w: int, h: int) -> None:
    """A valid grayscale PNG of w x h pixels in a few hundred KB (decodes to w*h bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes(w)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _prepare_inputs(input_dir: Path, outside: Path) -> None:
    dogs = sorted((DATA / "dog").glob("*.jpg"))
    for name, files in {"dog": dogs[:3], "one": dogs[:1]}.items():
        (input_dir / name).mkdir()
        for f in files:
            shutil.copy(f, input_dir / name / f.name)
    (input_dir / "empty").mkdir()
    (input_dir / "empty" / "notes.txt").write_text("not an image")
    mixed = input_dir / "mixed"
    mixed.mkdir()
    src = Image.open(dogs[0]).convert("RGB")
    for i, size in enumerate([(64, 48), (130, 100), (37, 200), (500, 333)]):
        src.resize(size).save(mixed / f"m{i}.jpg")
    modes = input_dir / "modes"
    modes.mkdir()
    src.convert("L").resize((80, 80)).save(modes / "gray.png")
    rgba = src.resize((90, 70)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(modes / "rgba.png")
    _png16(modes / "deep16.png", 72, 72)
    src.resize((64, 64)).convert("P").save(modes / "palette.png")
    src.convert("LA").resize((70, 90)).save(modes / "gray_alpha.png")
    corrupt = input_dir / "corrupt"
    corrupt.mkdir()
    shutil.copy(dogs[0], corrupt / "good.jpg")
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    huge = input_dir / "huge"
    huge.mkdir()
    src.convert("L").resize((9000, 9000)).save(huge / "huge.jpg", quality=50)  # 81 MP > the 80 MP guard
    bomb = input_dir / "bomb"
    bomb.mkdir()
    _bomb_png(bomb / "bomb.png", 10000, 10000)
    outside.mkdir()
    shutil.copy(dogs[0], outside / "secret.jpg")
    (input_dir / "escape").symlink_to(outside, target_is_directory=True)


def _prepare_deltas(folder: Path) -> None:
    """Damaged delta files present before the server starts (the Apply node lists them)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_verified(folder / "bad_wrong_keys.safetensors", {"diffusion_model.no_such_block.0.diff": torch.zeros(4)}, {})
    save_verified(folder / "bad_wrong_shape.safetensors",
                  {"diffusion_model.input_blocks.0.0.diff": torch.zeros(3, 3), "diffusion_model.out.2.diff_b": torch.zeros(4)}, {})
    good = save_verified(folder / "tmp_good.safetensors", {"diffusion_model.out.2.diff_b": torch.zeros(4)}, {})
    data = good.read_bytes()
    good.unlink()
    (folder / "bad_truncated.safetensors").write_bytes(data[:-3])
    (folder / "bad_pickle.safetensors").write_bytes(b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94.")
    save_file({"diffusion_model.out.2.diff_b": torch.zeros(4)}, str(folder / "bad_no_checksum.safetensors"))


pytestmark = pytest.mark.server  # starts its own ComfyUI (skipped by -m "not server")


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_ckpt, tiny_sdxl_ckpt):
    base = tmp_path_factory.mktemp("rel_inputs")
    server = make_server(base / "comfy", tiny_ckpt, (tiny_sdxl_ckpt,))
    _prepare_inputs(server.input_dir, base / "outside")
    _prepare_deltas(server.base_dir / "models" / "lipschitz_deltas")
    server.expected_hash = file_unet_hash(tiny_ckpt)
    with server:
        yield server
    print(f"\n[reliability inputs] {len(TRIED)} inputs tried: {', '.join(TRIED)}")


def _deltas(server) -> set[str]:
    return {p.name for p in (server.base_dir / "models" / "lipschitz_deltas").iterdir()}


def _train_graph(folder: str = "dog", ckpt: str = CKPT, **overrides) -> dict:
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "refs": {"class_type": "LipschitzLoadReferenceImages", "inputs": {"folder": folder, "resolution": RES, "crop": "center"}},
            "train": {"class_type": "LipschitzPersonalize", "inputs": personalize_inputs(**{"steps": 1, **overrides})},
            "sink": {"class_type": "LipschitzTestSink", "inputs": {"delta": ["train", 1]}}}


def _apply_graph(delta_file: str) -> dict:
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "apply": {"class_type": "LipschitzApplyDelta", "inputs": {"model": ["ckpt", 0], "delta_file": delta_file, "strength": 1.0}},
            "hash": {"class_type": "LipschitzTestUNetHash", "inputs": {"model": ["apply", 0]}}}


def _after_ok(server, before_files: set[str]) -> None:
    """No delta file appeared, the base is bit-identical and the server takes the next prompt."""
    assert _deltas(server) == before_files, "a refused input must not write anything"
    check = check_prompt(server.client, CKPT)
    assert check["hash"] == server.expected_hash, "the base U-Net changed"
    assert "lipschitz-train" not in check["threads"]


# (id, graph, where it is refused, input name, words of the fix that must appear)
BAD = [
    ("empty-folder", lambda: _train_graph("empty"), "error", "folder", "Put 3-6 photos"),
    ("corrupt-file", lambda: _train_graph("corrupt"), "error", "folder", "broken.png"),
    ("decompression-bomb", lambda: _train_graph("bomb"), "error", "folder", "bomb.png"),
    ("folder-dotdot", lambda: _train_graph(".."), "error", "folder", "outside ComfyUI's input directory"),
    ("folder-dotdot-nested", lambda: _train_graph("dog/../../outside"), "error", "folder", "outside"),
    ("folder-absolute", lambda: _train_graph("/etc"), "error", "folder", "absolute path"),
    ("folder-symlink-escape", lambda: _train_graph("escape"), "error", "folder", "outside"),
    ("folder-missing", lambda: _train_graph("no_such_folder"), "error", "folder", "Create it"),
    ("sdxl-model", lambda: _train_graph(ckpt=SDXL), "error", "model", "Load an SD1.5-family checkpoint"),
    ("lambda-negative", lambda: _train_graph(lambda_reg=-1.0), "rejected", "lambda_reg", "min"),
    ("lambda-nan", lambda: _train_graph(lambda_reg=float("nan")), "error", "lambda_reg", "Use 500"),
    ("lambda-inf", lambda: _train_graph(lambda_reg=float("inf")), "rejected", "lambda_reg", "max"),
    ("steps-zero", lambda: _train_graph(steps=0), "rejected", "steps", "min"),
    ("steps-negative", lambda: _train_graph(steps=-5), "rejected", "steps", "min"),
    ("lr-zero", lambda: _train_graph(learning_rate=0.0), "error", "learning_rate", "Use 2e-6"),
    ("lr-negative", lambda: _train_graph(learning_rate=-1e-4), "rejected", "learning_rate", "min"),
    ("lr-nan", lambda: _train_graph(learning_rate=float("nan")), "error", "learning_rate", "Use 2e-6"),
    ("prompt-empty", lambda: _train_graph(prompt=""), "error", "prompt", "Write the instance prompt"),
    ("prompt-blank", lambda: _train_graph(prompt="  \n\t "), "error", "prompt", "Write the instance prompt"),
    ("class-prompt-missing", lambda: {**_train_graph(), "train": {"class_type": "LipschitzPersonalize", "inputs":
        personalize_inputs(steps=1, class_images=["refs", 0], class_prompt=" ")}}, "error", "class_prompt", "Write the class prompt"),
    # The pre-flight estimate (trainer/memory.py) exceeds any machine's free memory: refused
    # before a delta or Adam state is allocated, whatever auto would pick.
    ("memory-estimate", lambda: _train_graph(resolution=2048, batch_size=64), "error", "memory",
     "lower resolution or batch 1"),
    ("memory-named-mode", lambda: _train_graph(resolution=2048, batch_size=64, memory="lean"), "error", "memory",
     "lower resolution or batch 1"),
    # Current ComfyUI's dynamic VRAM, where no non-dynamic copy can be made (a 0.3.x clone).
    ("dynamic-vram", lambda: {**_train_graph(), "dyn": {"class_type": "LipschitzTestDynamicVram",
                                                        "inputs": {"model": ["ckpt", 0]}},
                              "train": {"class_type": "LipschitzPersonalize", "inputs":
                                        personalize_inputs(steps=1, model=["dyn", 0])}}, "error", "model",
     "Restart ComfyUI with --disable-dynamic-vram"),
    ("delta-wrong-keys", lambda: _apply_graph("bad_wrong_keys.safetensors"), "error", "delta_file", "Use a delta trained"),
    ("delta-wrong-shape", lambda: _apply_graph("bad_wrong_shape.safetensors"), "error", "delta_file", "architecture"),
    ("delta-truncated", lambda: _apply_graph("bad_truncated.safetensors"), "error", "delta_file", "Delete the file"),
    ("delta-not-safetensors", lambda: _apply_graph("bad_pickle.safetensors"), "error", "delta_file", "Delete the file"),
    ("delta-no-checksum", lambda: _apply_graph("bad_no_checksum.safetensors"), "error", "delta_file", "checksum"),
    ("delta-path-traversal", lambda: _apply_graph("../../checkpoints/tiny_sd15.safetensors"), "error", "delta_file", "Pick a file from the list"),
    ("delta-absolute-path", lambda: _apply_graph("/etc/passwd"), "error", "delta_file", "Pick a file from the list"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_before_training(srv, case):
    label, build, where, input_name, fix = case
    TRIED.append(label)
    before = _deltas(srv)
    got, message, result = run_expect_error(srv.client, build())
    assert got == where, f"{label}: expected {where}, got {got}: {message[:2000]}"
    if where == "rejected":  # ComfyUI's own validation at POST /prompt: nothing ran
        message = node_errors_text(message)
        assert input_name in message and fix in message, message[:2000]
    else:
        assert f"{input_name}:" in message and fix in message, message[:2000]
        assert not result.events("lipschitz.progress"), "training started"
    _after_ok(srv, before)


def _train_ok(server, graph: dict) -> tuple[object, list[str]]:
    result = server.client.run(graph, timeout=600)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    return result, result.texts_for("train")


def test_one_image_trains_with_a_warning_and_hostile_save_names_stay_in_the_delta_folder(srv):
    TRIED.extend(["1-image", "save-name-traversal"])
    graph = _train_graph("one", seed=31)
    graph["save"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1],
                                                                     "filename_prefix": "../../../../outside_evil"}}
    result, texts = _train_ok(srv, graph)
    assert any("only 1 reference image" in t for t in texts), texts
    # auto says which memory mode it picked, why, and what the anchor is.
    plan = [t for t in texts if t.startswith("memory: ")]
    assert plan and "auto:" in plan[0] and "GB are free" in plan[0] and "anchor theta0 in float32" in plan[0], texts
    assert [e["step"] for e in result.events("lipschitz.progress")] == [1]
    saved = result.outputs["save"]["text"][0]
    assert saved.startswith("lipschitz_deltas/outside_evil_") and ".." not in saved
    assert (srv.base_dir / "models" / saved).is_file()
    assert not list(srv.base_dir.parent.rglob("outside_evil*"))[1:], "a file escaped the delta folder"
    assert check_prompt(srv.client, CKPT)["hash"] == srv.expected_hash


def test_long_prompt_is_truncated_with_a_notice(srv):
    TRIED.append("prompt-over-77-tokens")
    _, texts = _train_ok(srv, _train_graph(prompt=LONG_PROMPT, seed=32))
    assert any("longer than 77 tokens" in t and "first 77" in t for t in texts), texts


def test_mixed_sizes_image_modes_and_a_huge_photo_load_as_training_squares(srv):
    TRIED.extend(["mixed-sizes", "grayscale+RGBA+16-bit+palette+LA PNG", "huge-81MP-jpeg"])
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}
    for folder in ("mixed", "modes", "huge"):
        graph[f"{folder}_refs"] = {"class_type": "LipschitzLoadReferenceImages",
                                   "inputs": {"folder": folder, "resolution": RES, "crop": "center"}}
        graph[f"{folder}_view"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{folder}_refs", 0]}}
    graph["proc"] = {"class_type": "LipschitzTestProcess", "inputs": {}}
    rss_before = check_prompt(srv.client, CKPT)["rss"]
    result = srv.client.run(graph, timeout=600)
    assert result.status == "success", result.error
    counts = {"mixed": 4, "modes": 5, "huge": 1}
    for folder, n in counts.items():
        images = result.outputs[f"{folder}_view"]["images"]
        assert len(images) == n, folder
        for info in images:
            img = Image.open(srv.base_dir / "temp" / info.get("subfolder", "") / info["filename"])
            assert img.size == (RES, RES) and img.mode == "RGB", (folder, img.size, img.mode)
    rss_after = int(result.outputs["proc"]["text"][0].split("=")[1])
    assert rss_after - rss_before < 600 * 2**20, f"loading grew memory by {(rss_after - rss_before) / 2**20:.0f} MiB"
    # and these batches train
    _, texts = _train_ok(srv, _train_graph("modes", seed=33))
    assert not any("warning" in t for t in texts)


def test_damaged_cached_run_is_set_aside_and_retrained_and_a_damaged_resume_is_refused(srv):
    TRIED.extend(["damaged-auto-cache", "damaged-partial-resume"])
    folder = srv.base_dir / "models" / "lipschitz_deltas"
    graph = _train_graph(seed=35, steps=2)
    before = _deltas(srv)
    _train_ok(srv, graph)
    (auto,) = [folder / n for n in _deltas(srv) - before]
    key = auto.name[len("auto_"):-len(".safetensors")]
    data = bytearray(auto.read_bytes())
    data[-10] ^= 0xFF
    auto.write_bytes(bytes(data))
    check_prompt(srv.client, CKPT)  # another prompt: the in-memory cache forgets the run
    result, texts = _train_ok(srv, graph)
    assert [e["step"] for e in result.events("lipschitz.progress")] == [1, 2], "the damaged run must be retrained"
    assert any("damaged" in t for t in texts), texts
    assert (folder / (auto.name + ".corrupt")).is_file()
    load_verified(auto)  # the new file is whole

    auto.unlink()
    partial = folder / f"partial_{key}.safetensors"
    partial.write_bytes(b"\x80\x04 not a safetensors file")
    got, message, result = run_expect_error(srv.client, _train_graph(seed=35, steps=2, resume=True))
    assert got == "error" and "resume:" in message and partial.name in message and "Turn resume off" in message, message
    assert not result.events("lipschitz.progress")
    result, _ = _train_ok(srv, _train_graph(seed=35, steps=2, resume=False))
    assert [e["step"] for e in result.events("lipschitz.progress")] == [1, 2]
    assert not partial.exists(), "a completed run replaces the stale partial file"
    assert check_prompt(srv.client, CKPT)["hash"] == srv.expected_hash


def test_status_route_validates_its_input_and_reads_no_path(srv):
    TRIED.append("status-route-queries")
    client = srv.client
    assert isinstance(client.get("/lipschitz/status"), dict)
    assert isinstance(client.get("/api/lipschitz/status?node=train"), dict)
    # A node id is only a key of an in-memory dict: ".." passes the pattern and finds nothing.
    assert client.get("/lipschitz/status?node=..") == {}
    hostile = ["../../etc/passwd", "/etc/passwd", "a" * 65, "x y", "%00", "train;rm", "{}", "", "\x00"]
    for node in hostile:
        with pytest.raises(ComfyServerError, match="HTTP 400"):
            client.get("/lipschitz/status?" + urllib.parse.urlencode({"node": node}))
    for method in ("POST", "PUT", "DELETE"):
        with pytest.raises(ComfyServerError, match="HTTP 405"):
            client._request(method, "/lipschitz/status", body={"node": "../../etc/passwd"})
    with pytest.raises(ComfyServerError, match="HTTP (404|400)"):
        client.get("/lipschitz/status/..%2F..%2Fetc%2Fpasswd")
    body = json.dumps(client.get("/lipschitz/status"))
    assert "root:" not in body
