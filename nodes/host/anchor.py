"""theta0: where the anchor of the Lipschitz term comes from - the checkpoint file (found from
the patcher or by reading the prompt graph) or the model as ComfyUI holds it - and reading it.

Imports ComfyUI, never :mod:`trainer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import folder_paths
from safetensors import safe_open

from ...trainer.errors import NodeInputError
from .model import require_on_device


# Loader nodes whose MODEL holds a file's U-Net as stored there: class -> (input, folder).
LOADERS = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints"), "CheckpointLoader": ("ckpt_name", "checkpoints"),
           "UNETLoader": ("unet_name", "diffusion_models")}
# Where an SD1.5 U-Net's tensors sit in the files those loaders read (ldm layout).
UNET_PREFIXES = ("model.diffusion_model.", "")
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Anchor:
    """Where theta0 comes from: the checkpoint file's values, or the model as ComfyUI holds it."""

    dtype: torch.dtype
    file: Path | None
    """The file to read theta0 from (its values are wider than the loaded model's), or ``None``:
    the model's own weights are theta0."""
    prefix: str
    why: str
    """How the node says where theta0 comes from, e.g. ``from the checkpoint file x.safetensors``."""

    @property
    def name(self) -> str:
        """``float16``, ``float32``...: the anchor's dtype as the node reports it."""
        return str(self.dtype).removeprefix("torch.")


def source_file(model, prompt: dict | None = None, node_id: str | None = None) -> tuple[Path | None, str]:
    """The file ``model``'s U-Net was loaded from, unchanged since, or ``(None, why not)``.

    Current ComfyUI records the loader call on the patcher (``cached_patcher_init``, kept by
    ``clone``); 0.3.x does not, so the prompt graph is read too: the node's ``model`` input
    linked straight to a checkpoint or U-Net loader.  A model that carries weight patches
    (a LoRA, a merge) is not the file's, so it has none.
    """
    if getattr(model, "patches", None):
        return None, "the model carries weight patches (a LoRA or a merge), so its weights are not the file's"
    init = getattr(model, "cached_patcher_init", None)
    if init and getattr(init[0], "__name__", "").startswith(("load_checkpoint_guess_config", "load_diffusion_model")):
        return Path(init[1][0]), ""
    link = ((prompt or {}).get(str(node_id), {}).get("inputs", {}) or {}).get("model")
    source = (prompt or {}).get(str(link[0])) if isinstance(link, list) and link else None
    if source and source.get("class_type") in LOADERS:
        name, folder = LOADERS[source["class_type"]]
        path = folder_paths.get_full_path(folder, source.get("inputs", {}).get(name, ""))
        if path:
            return Path(path), ""
    return None, "the model input does not come straight from a checkpoint loader, so its file is unknown"


def choose_anchor(model, unet: nn.Module, prompt: dict | None = None, node_id: str | None = None) -> Anchor:
    """theta0 for the faithful modes: the checkpoint file's values where ComfyUI holds the
    U-Net in a narrower dtype than the file stores (fp16 on a GPU from an fp32 file), else
    the model itself.  Reads the file's header only."""
    held = model.model_dtype()
    path, why_not = source_file(model, prompt, node_id)
    if path is None:
        return Anchor(held, None, "", f"as ComfyUI loaded the model ({why_not})")
    if path.suffix != ".safetensors":
        return Anchor(held, None, "", f"as ComfyUI loaded the model ({path.name} is not a .safetensors file)")
    names = {n: tuple(p.shape) for n, p in unet.named_parameters()}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        prefix = next((pre for pre in UNET_PREFIXES if all(pre + n in keys for n in names)), None)
        if prefix is None:
            return Anchor(held, None, "", f"as ComfyUI loaded the model ({path.name} does not hold its U-Net in "
                                          "the SD1.5 layout)")
        stored = {STORED_DTYPES.get(f.get_slice(prefix + n).get_dtype()) for n in names}
    if held == torch.float32 or stored == {held}:  # fp32 holds fp16 and bf16 values exactly
        return Anchor(held, None, "", f"as ComfyUI loaded the model (it holds the values stored in {path.name} exactly)")
    return Anchor(torch.float32, path, prefix, f"from the checkpoint file {path.name} "
                                                f"(ComfyUI holds the model in {str(held).removeprefix('torch.')})")


FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, n)}


def require_addable(anchor: Anchor, mode: str) -> None:
    """Refuse, before any work, to train against fp8 weights: torch cannot add a delta to them
    (it has no fp8 type promotion), so the run would fail at its first step."""
    if anchor.file is None and anchor.dtype in FLOAT8:
        raise NodeInputError(
            "model", f"ComfyUI holds this U-Net in {anchor.name} and memory={mode} trains against the model as "
                     f"held ({anchor.why}); a delta cannot be added to fp8 weights",
            "Use memory=faithful or lean with the model straight from its .safetensors checkpoint loader (theta0 "
            "is then read from the file), or load the U-Net in fp16/fp32 (no --fp8_e4m3fn-unet; weight_dtype "
            "default in Load Diffusion Model)")


def read_anchor(anchor: Anchor, unet: nn.Module, device: torch.device) -> dict[str, Tensor] | None:
    """theta0 from ``anchor.file`` on ``device`` (``None``: the model's weights are theta0),
    checked against the U-Net's shapes; one tensor at a time, so the peak is the anchor."""
    if anchor.file is None:
        return None
    out = {}
    with safe_open(str(anchor.file), framework="pt") as f:
        for name, p in unet.named_parameters():
            t = f.get_tensor(anchor.prefix + name)
            if tuple(t.shape) != tuple(p.shape):
                raise NodeInputError("model", f"{anchor.file.name}: {name} has shape {tuple(t.shape)}, the loaded "
                                              f"model {tuple(p.shape)}", "Load the checkpoint with CheckpointLoaderSimple")
            out[name] = t.to(device, torch.float32)
    require_on_device(out.items(), device, "anchor tensors")
    return out
