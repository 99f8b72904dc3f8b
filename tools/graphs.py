"""API-format graphs built from stock nodes and ours, for the server tests and ``tools/bench.py``."""
from __future__ import annotations

import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"  # the shipped photos (tests/data/dog)
CKPT = "tiny_sd15.safetensors"
RES = 64  # 8x8 latents: the tiny U-Net trains a step in well under a second


def install_subject(input_dir: Path, name: str = "dog") -> str:
    """Copy the shipped reference photos into the server's input folder."""
    target = input_dir / name
    target.mkdir(parents=True, exist_ok=True)
    for f in (DATA / "dog").glob("*.jpg"):
        shutil.copy(f, target / f.name)
    return name


def personalize_inputs(**overrides) -> dict:
    inputs = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["refs", 0],
              "prompt": "a photo of sks dog", "lambda_reg": 500.0, "steps": 4, "learning_rate": 1e-4,
              "seed": 2025, "resolution": RES,
              "preview_every": 0}  # previews cost sampling time: the tests that check them turn them on
    inputs.update(overrides)
    return inputs


def loader(folder: str = "dog", ckpt: str = CKPT) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "refs": {"class_type": "LipschitzLoadReferenceImages", "inputs": {"folder": folder, "resolution": RES, "crop": "center"}},
    }


def sample(graph: dict, model: list, prefix: str, text: str = "a photo of sks dog in the snow", seed: int = 1) -> dict:
    """Add KSampler -> VAEDecode -> SaveImage for ``model``; node ids are prefixed."""
    p = prefix
    graph[f"{p}_pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}}
    graph[f"{p}_neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}}
    graph[f"{p}_lat"] = {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}}
    graph[f"{p}_ks"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": [f"{p}_pos", 0], "negative": [f"{p}_neg", 0], "latent_image": [f"{p}_lat", 0],
        "seed": seed, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    graph[f"{p}_dec"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{p}_ks", 0], "vae": ["ckpt", 2]}}
    graph[f"{p}_save"] = {"class_type": "SaveImage", "inputs": {"images": [f"{p}_dec", 0], "filename_prefix": p}}
    return graph


def personalize_graph(prefix: str, **overrides) -> dict:
    graph = loader()
    graph["train"] = {"class_type": "LipschitzPersonalize", "inputs": personalize_inputs(**overrides)}
    return graph
