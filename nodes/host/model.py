"""ComfyUI's MODEL -> the U-Net a training run loads: the SD1.5 guard, the weights' fingerprint,
dynamic VRAM, loading on the device, and the device memory the pre-flight check reads.

Imports ComfyUI, never :mod:`trainer`: :mod:`.run` joins the two.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import comfy.model_base
import comfy.model_management
import comfy.supported_models

from ...trainer.errors import NodeInputError
from .attention import training_options

if TYPE_CHECKING:
    from .anchor import Anchor


def require_sd15(model, input_name: str = "model") -> None:
    """Refuse anything that is not an SD1.5-family eps-prediction U-Net, before any work."""
    config = model.model.model_config
    kind = type(config).__name__
    if not isinstance(config, comfy.supported_models.SD15):
        raise NodeInputError(
            input_name, f"this is a {kind} model, but the Lipschitz fine-tune is defined for Stable Diffusion 1.5",
            "Load an SD1.5-family checkpoint (e.g. v1-5-pruned-emaonly.safetensors) with CheckpointLoaderSimple")
    if model.model.model_type != comfy.model_base.ModelType.EPS:
        raise NodeInputError(
            input_name, f"this SD1.5 model predicts {model.model.model_type.name}, not eps",
            "Use an eps-prediction SD1.5 checkpoint (v-prediction and other objectives are not supported)")
    if config.unet_config.get("in_channels", 4) != 4:
        raise NodeInputError(
            input_name, f"this U-Net takes {config.unet_config['in_channels']} input channels (inpainting/instruct model)",
            "Use a plain text-to-image SD1.5 checkpoint")


def alphas_cumprod(model) -> Tensor:
    """``abar_t`` of the model's own discrete schedule: ``sigma_t^2 = (1 - abar_t) / abar_t``."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()
    return 1.0 / (1.0 + sigmas**2)


@torch.no_grad()
def fingerprint(unet: nn.Module) -> str:
    """A short, stable identity of the U-Net weights (any patches applied), the same whatever
    dtype they were loaded in.

    Call it on a loaded model (:func:`load_for_training`, :func:`load_for_reading`): at rest
    the shared module may still hold another clone's patched weights.  Hashes every tensor's
    name, shape and a strided sample of about 4096 of its values rounded to fp16, which takes
    milliseconds on an 860M-parameter U-Net while any real fine-tune or merge changes it.  The
    rounding is what ComfyUI applies when it loads an fp32 checkpoint in fp16 (on GPUs), so
    the same checkpoint gives the same fingerprint on a CPU (fp32) and a GPU (fp16), and a
    delta trained on one machine applies on another.
    """
    h = hashlib.sha256()
    for name, p in unet.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].cpu().to(torch.float16)
        h.update(f"{name}|{tuple(p.shape)}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def load_for_reading(model) -> nn.Module:
    """Load ``model`` as sampling would (its patches applied) and return its U-Net."""
    comfy.model_management.load_models_gpu([model])
    return model.model.diffusion_model


def checkpoint_units(unet: nn.Module) -> list[nn.Module]:
    """The layers of every U-Net block, each recomputed in backward when checkpointing."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    return [layer for block in blocks for layer in block if not any(True for _ in layer.parameters(recurse=False))]


def trainable(model) -> tuple[object, str | None]:
    """The patcher the training loads, and a note for the node: ``model`` itself, or under
    dynamic VRAM (current ComfyUI's default: weights stay on the CPU and are staged per layer,
    so a delta on the GPU would meet an anchor on the CPU) a non-dynamic clone, which ComfyUI
    rebuilds from the model's file.  Refused, before any work, where no such clone can be made."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if not (callable(is_dynamic) and is_dynamic()):
        return model, None
    try:
        clone = model.clone(disable_dynamic=True)
    except (TypeError, RuntimeError) as exc:  # an older clone() or no recorded loader call
        clone, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "the copy is still dynamic"
    if clone is None or clone.is_dynamic():
        raise NodeInputError("model", "ComfyUI holds this model with dynamic VRAM (weights staged per layer), which "
                                      f"training cannot use, and it could not make a non-dynamic copy ({why})",
                             "Restart ComfyUI with --disable-dynamic-vram, or load the model with CheckpointLoaderSimple")
    return clone, "dynamic VRAM: training a non-dynamic copy of the model (ComfyUI reloads it from its file)"


@dataclass
class LoadedUNet:
    """The U-Net as loaded for training on a clone that carries the compute dtype."""

    patcher: object
    unet: nn.Module
    device: torch.device
    dtype: torch.dtype
    transformer_options: dict
    """Passed to every forward: PyTorch's attention, whatever ComfyUI samples with (:mod:`.attention`)."""

    def eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x_t.to(self.dtype), t.float(), context=cond.to(self.dtype),
                         transformer_options=self.transformer_options).float()


def load_for_training(model, dtype: torch.dtype, weights_needed: bool = True) -> LoadedUNet:
    """Load a clone of ``model`` fully on the torch device, computing in ``dtype``.

    The clone shares the base ``nn.Module``: its weights are read, never written (the trainer
    adds its delta on the fly); only the compute dtype is an object patch of the clone.  A
    partial load (``--novram``, ``--lowvram``, too little VRAM) leaves weights on the CPU,
    which the delta on the device cannot be added to: refused (:func:`require_on_device`).

    ``weights_needed=False``: theta0 is read from the checkpoint file (:mod:`.anchor`), and every
    layer computes with ``theta0 + delta`` swapped in for its own tensors, which are never read
    (``trainer/delta.py``).  ComfyUI's copy of the U-Net (fp16 on a GPU, 1.7 GB for SD1.5) then
    stays off the device: the models ComfyUI holds there are unloaded (which also puts back any
    other clone's patches on the shared weights) and this one is not loaded.
    """
    patcher = model.clone()
    patcher.set_model_compute_dtype(dtype)
    device = torch.device(patcher.load_device)
    if weights_needed:
        comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
        require_on_device(patcher.model.diffusion_model.named_parameters(), device)
    else:
        comfy.model_management.free_memory(1e30, device)
    return LoadedUNet(patcher, patcher.model.diffusion_model, device, dtype, training_options())


def require_on_device(tensors, device: torch.device, what: str = "U-Net weights") -> None:
    """Refuse training where any of ``tensors`` (name, tensor) is not on ``device``."""
    stray = [(n, t.device) for n, t in tensors if t.device != device]
    if stray:
        name, where = stray[0]
        raise NodeInputError("model", f"{len(stray)} {what} are on {where}, not on the training device {device} "
                                      f"(e.g. {name}): ComfyUI loaded the model partially",
                             "Restart ComfyUI without --novram or --lowvram, free VRAM (close other programs), "
                             "or choose a leaner memory mode")


@dataclass
class TrainingMemory:
    """What the pre-flight check needs to know about the device, read before anything loads."""

    device: torch.device
    free: float
    """Bytes free for training: ComfyUI's free figure (VRAM plus torch's cache on a GPU,
    available RAM on the CPU) plus, on a GPU, what the loaded models hold, which
    :func:`load_for_training` unloads to make room."""
    on_cpu: bool
    """The model's weights already sit in that memory (the CPU, where ComfyUI keeps them)."""
    model_dtype: torch.dtype
    params: int
    largest: int

    def anchor_bytes(self, anchor: Anchor) -> int:
        """Bytes per parameter that theta0 adds to the training memory: the file's values (the
        model's own copy is then not loaded, :func:`load_for_training`), or the model itself,
        which on the CPU is already in RAM."""
        if anchor.file is not None:
            return anchor.dtype.itemsize
        return 0 if self.on_cpu else self.model_dtype.itemsize


def training_memory(model) -> TrainingMemory:
    device = torch.device(model.load_device)
    free = float(comfy.model_management.get_free_memory(device))
    if device.type != "cpu":
        free += sum(m.model_loaded_memory() for m in comfy.model_management.current_loaded_models
                    if m.model is not None and torch.device(m.device) == device)
    sizes = [p.numel() for p in model.model.diffusion_model.parameters()]
    return TrainingMemory(device, free, device.type == "cpu", model.model_dtype(), sum(sizes), max(sizes))
