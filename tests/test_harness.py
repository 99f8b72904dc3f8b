"""Checks of the test harness itself: tiny checkpoints and a stock graph on a real server."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

DETECT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import make_tiny_checkpoint as m
comfy = m._import_comfy_cpu()
out = {}
for path in sys.argv[2:]:
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
    out[path] = {"config": type(model.model.model_config).__name__,
                 "model": type(model.model).__name__,
                 "clip": type(clip.cond_stage_model).__name__, "vae": vae is not None,
                 "unet": {k: v for k, v in model.model.model_config.unet_config.items()
                          if isinstance(v, (int, float, str, bool, list, tuple)) and k != "dtype"}}
print("RESULT " + json.dumps(out))
"""


def test_tiny_checkpoints_detected(tiny_ckpt, tiny_sdxl_ckpt):
    proc = subprocess.run([sys.executable, "-c", DETECT, str(REPO_ROOT / "tools"), str(tiny_ckpt),
                           str(tiny_sdxl_ckpt)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    sd15, sdxl = res[str(tiny_ckpt)], res[str(tiny_sdxl_ckpt)]
    unet = sd15.pop("unet")
    assert sd15 == {"config": "SD15", "model": "BaseModel", "clip": "SD1ClipModel", "vae": True}
    # The benchmarks' bare loop trains the U-Net ComfyUI builds from this file (same heads, ...).
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from bench_models import SD15_TINY

    for key in ("num_heads", "num_head_channels", "model_channels", "channel_mult", "num_res_blocks",
                "transformer_depth", "transformer_depth_output", "context_dim", "use_linear_in_transformer"):
        assert json.loads(json.dumps(SD15_TINY.get(key, False))) == json.loads(json.dumps(unet.get(key, False))), key
    assert sdxl["config"] == "SDXL" and sdxl["model"] == "SDXL"
    assert sdxl["clip"] == "SDXLClipModel"


def stock_graph(ckpt_name="tiny_sd15.safetensors", seed=0, prefix="harness"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_server_runs_stock_graph(comfy_server):
    client = comfy_server.client
    info = client.object_info()
    assert "CheckpointLoaderSimple" in info
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "tiny_sd15.safetensors" in ckpts

    result = client.run(stock_graph(), timeout=600)
    assert result.status == "success", (result.error, comfy_server.log_tail())
    assert result.events("execution_start") and result.events("executed")
    images = client.output_images(result)
    assert len(images) == 1 and images[0].suffix == ".png" and images[0].is_file()
    arr = np.asarray(Image.open(images[0]).convert("RGB"), dtype=np.float32)
    assert arr.shape == (64, 64, 3)
    assert np.isfinite(arr).all()

    # identical re-queue is served from the cache
    again = client.run(stock_graph(), timeout=600)
    assert again.status == "success"
    assert "5" in again.cached_nodes
