"""The ComfyUI side of the metric nodes: which encoders the model folders hold, where
ComfyUI's CLIP tokenizer is, which device to run on (the scoring is
:mod:`trainer.evaluation.evaluate`)."""
from __future__ import annotations

from pathlib import Path

import torch

import comfy.model_management
import comfy.sd1_clip

from ...trainer.errors import NodeInputError
from .folders import eval_dirs


def _usable(entry: Path) -> bool:
    return (entry.is_dir() and (entry / "config.json").is_file()) or entry.suffix == ".safetensors"


def model_names() -> list[str]:
    """Folders with ``config.json`` and ``.safetensors`` files in ``models/eval`` and
    ``models/clip_vision`` (first found wins on a name clash)."""
    names = [e.name for d in eval_dirs() if d.is_dir() for e in sorted(d.iterdir()) if _usable(e)]
    return list(dict.fromkeys(names))


def model_path(name: str) -> Path:
    if not name or Path(name).name != name:
        raise NodeInputError("model_name", f"{name!r} is not a name in models/eval or models/clip_vision",
                             "Pick one from the list (put the model there first)")
    for folder in eval_dirs():
        if (folder / name).exists():
            return folder / name
    raise NodeInputError("model_name", f"{name!r} is in none of {[str(d) for d in eval_dirs()]}",
                         "Put it in models/eval/ (a folder with config.json, or a .safetensors file) and reload")


def tokenizer_dir() -> Path:
    """ComfyUI's copy of the CLIP BPE tokenizer (for a CLIP given as one .safetensors file)."""
    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"  # `comfy` itself is a namespace package


def device_for(encoders: list) -> torch.device:
    """ComfyUI's compute device, with room made there for the encoders' weights (ComfyUI
    unloads its own models as it would for a model of that size)."""
    dev = comfy.model_management.get_torch_device()
    nbytes = sum(p.numel() * p.element_size() for e in encoders if e is not None for p in e.model.parameters())
    if dev.type != "cpu":
        comfy.model_management.free_memory(int(nbytes * 1.5), dev)
    return dev
