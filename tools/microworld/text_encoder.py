"""The micro-world's text encoder: SD1.5's CLIP-L text model with fixed random weights that
come back bitwise on every machine.

The U-Net learned to read exactly these weights' outputs, so they must not depend on a
library's random generator (torch's and numpy's streams are not promised stable across
versions).  Every element is a pure function of the tensor's name and the element's index:
the SplitMix64 integer hash (uint64 arithmetic, identical everywhere), its top 24 bits as an
exactly representable float32 in [-1, 1), times a float32 scale.  So the 123M weights are not
committed: ``build.py`` regenerates them (a few seconds) and checks their sha256.

Scales: token embeddings dominate (std 1) and every residual branch's output projection is
small, so the last hidden state stays close to ``LayerNorm(token + position embedding)``:
a prompt's words stay readable per token, which is what the U-Net's cross-attention needs.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np

PREFIX = "cond_stage_model.transformer."
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_RESIDUAL_OUT = ("out_proj.", "mlp.fc2.")


def uniform(name: str, count: int) -> np.ndarray:
    """``count`` float32 values in [-1, 1), a pure function of ``name`` and the index."""
    salt = np.uint64(zlib.crc32(name.encode()))
    with np.errstate(over="ignore"):
        z = np.arange(count, dtype=np.uint64) + (salt << np.uint64(32)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    top = (z >> np.uint64(40)).astype(np.int64) - (1 << 23)  # 24-bit integer, exact in float32
    return top.astype(np.float32) * np.float32(2.0 ** -23)


def value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The weight named ``name`` (a key of ComfyUI's ``CLIPTextModel``)."""
    if name.endswith("position_ids"):
        return np.broadcast_to(np.arange(shape[-1], dtype=np.int64), shape).copy()
    if len(shape) <= 1:
        return np.zeros(shape, np.float32) if name.endswith("bias") else np.ones(shape, np.float32)
    if "token_embedding" in name:
        std = 1.0
    elif "position_embedding" in name:
        std = 0.1
    else:
        std = (0.05 if any(p in name for p in _RESIDUAL_OUT) else 1.0) / math.sqrt(math.prod(shape[1:]))
    scale = np.float32(std * math.sqrt(3.0))  # uniform [-1, 1) has variance 1/3
    return (uniform(name, math.prod(shape)) * scale).reshape(shape)


def clip_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of SD1.5's text model as ComfyUI builds it (12 layers, CLIP-L widths),
    without ``text_projection`` (SD1.5 files do not store it)."""
    import comfy.clip_model
    import comfy.ops
    import torch
    with open(Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json") as f:
        config = json.load(f)
    model = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.pop("text_projection.weight", None)
    return shapes


def state_dict() -> dict:
    """The checkpoint's text-encoder tensors (fp16, as SD1.5 files store them)."""
    import torch
    out = {}
    for key, shape in sorted(clip_shapes().items()):
        t = torch.from_numpy(value(key, shape))
        out[PREFIX + key] = t if t.dtype == torch.int64 else t.to(torch.float16).contiguous()
    return out


def digest(sd: dict) -> str:
    """sha256 over the tensors' names and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(sd):
        h.update(key.encode())
        h.update(sd[key].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()
