"""ComfyUI's MODEL / CLIP / VAE / IMAGE -> the tensors and functions a training run needs, and back.

Imports ComfyUI, never :mod:`trainer`: :mod:`.run` joins the two.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.supported_models
import folder_paths
from safetensors import safe_open

from ...trainer.files.delta_file import PATCH_PREFIX
from ...trainer.errors import NodeInputError


# -- the model ---------------------------------------------------------------------------
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


def sage_note() -> str | None:
    """SageAttention (``--use-sage-attention``) has no backward pass: the training computes its
    attention with PyTorch's instead (:attr:`LoadedUNet.transformer_options`); sampling keeps it."""
    if not comfy.model_management.sage_attention_enabled():
        return None
    return ("attention: ComfyUI runs SageAttention (--use-sage-attention), which has no backward pass; "
            "the training uses PyTorch's attention instead, sampling keeps SageAttention")


def _backward_safe_attention(func, *args, **kwargs):
    """ComfyUI's ``optimized_attention_override``: PyTorch's SDPA in place of ``func``."""
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


@dataclass
class LoadedUNet:
    """The U-Net as loaded for training on a clone that carries the compute dtype."""

    patcher: object
    unet: nn.Module
    device: torch.device
    dtype: torch.dtype
    transformer_options: dict
    """Passed to every forward: with SageAttention on, an attention that has a backward."""

    def eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x_t.to(self.dtype), t.float(), context=cond.to(self.dtype),
                         transformer_options=self.transformer_options).float()


def load_for_training(model, dtype: torch.dtype) -> LoadedUNet:
    """Load a clone of ``model`` fully on the torch device, computing in ``dtype``.

    The clone shares the base ``nn.Module``: its weights are read, never written (the trainer
    adds its delta on the fly); only the compute dtype is an object patch of the clone.  A
    partial load (``--novram``, ``--lowvram``, too little VRAM) leaves weights on the CPU,
    which the delta on the device cannot be added to: refused (:func:`require_on_device`).
    """
    patcher = model.clone()
    patcher.set_model_compute_dtype(dtype)
    comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    device = torch.device(patcher.load_device)
    require_on_device(patcher.model.diffusion_model.named_parameters(), device)
    options = {"optimized_attention_override": _backward_safe_attention} if sage_note() else {}
    return LoadedUNet(patcher, patcher.model.diffusion_model, device, dtype, options)


def require_on_device(tensors, device: torch.device, what: str = "U-Net weights") -> None:
    """Refuse training where any of ``tensors`` (name, tensor) is not on ``device``."""
    stray = [(n, t.device) for n, t in tensors if t.device != device]
    if stray:
        name, where = stray[0]
        raise NodeInputError("model", f"{len(stray)} {what} are on {where}, not on the training device {device} "
                                      f"(e.g. {name}): ComfyUI loaded the model partially",
                             "Restart ComfyUI without --novram or --lowvram, free VRAM (close other programs), "
                             "or choose a leaner memory mode")


# -- the anchor ---------------------------------------------------------------------------
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

    def anchor_bytes(self, anchor: Anchor) -> tuple[int, int]:
        """Bytes per parameter of ``(theta0, the model's own copy)`` in the training memory:
        on the CPU the model is already in RAM; on a GPU it is loaded beside a file anchor."""
        model = 0 if self.on_cpu else self.model_dtype.itemsize
        if anchor.file is None:
            return model, 0
        return anchor.dtype.itemsize, model


def training_memory(model) -> TrainingMemory:
    device = torch.device(model.load_device)
    free = float(comfy.model_management.get_free_memory(device))
    if device.type != "cpu":
        free += sum(m.model_loaded_memory() for m in comfy.model_management.current_loaded_models
                    if m.model is not None and torch.device(m.device) == device)
    sizes = [p.numel() for p in model.model.diffusion_model.parameters()]
    return TrainingMemory(device, free, device.type == "cpu", model.model_dtype(), sum(sizes), max(sizes))


# -- conditioning and latents ------------------------------------------------------------
def encode_prompt(clip, prompt: str) -> tuple[Tensor, bool]:
    """The prompt's [1, 77, 768] embedding, and whether it had to be cut to 77 tokens."""
    tokens = clip.tokenize(prompt)
    cond = clip.encode_from_tokens(tokens)
    truncated = cond.shape[1] > 77
    return cond[:, :77].detach().float().cpu(), truncated


def encode_images(vae, model, images: Tensor, seed: int) -> Tensor:
    """VAE latents of an IMAGE batch [N,H,W,C] in the U-Net's scale (x0.18215 for SD1.5).

    Like the reference code, each latent is a sample of the VAE posterior, drawn once and
    cached (ComfyUI's encode returns the posterior mode): the shared VAE is switched to
    sampling only for this call, under a forked RNG seeded with the run's seed.
    """
    regularizer = getattr(vae.first_stage_model, "regularization", None)
    sampling = getattr(regularizer, "sample", None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if sampling is not None:
            regularizer.sample = True
        try:
            latents = vae.encode(images[..., :3])
        finally:
            if sampling is not None:
                regularizer.sample = sampling
    return model.model.process_latent_in(latents).detach().float().cpu()


# -- the result --------------------------------------------------------------------------
SAMPLING = ("patch", "exact")
"""How the MODEL output carries the delta: ``patch``, ComfyUI's diff patch (added to the weights
and rounded to the model's storage dtype, fp16 on GPUs, as a LoRA is); ``exact``, a weight
wrapper that adds it after ComfyUI casts each weight to the compute dtype, which this clone
sets to fp32 (every value of the delta reaches the sampler; slower sampling on GPUs)."""


def require_sampling(sampling: str) -> None:
    """Refuse a ``sampling`` value that is not one of :data:`SAMPLING`."""
    if sampling not in SAMPLING:
        raise NodeInputError("sampling", f"unknown choice {sampling!r}", f"Use one of {', '.join(SAMPLING)}")


class ExactDelta:
    """ComfyUI weight wrapper: ``weight + strength * delta`` in the weight's compute dtype.

    ``move_to`` lets ComfyUI move the delta with its layer (and count its memory)."""

    def __init__(self, delta: Tensor, strength: float) -> None:
        self.delta, self.strength = delta, strength

    def __call__(self, weight: Tensor) -> Tensor:
        d = self.delta.to(weight.device, weight.dtype)
        return weight + (d if self.strength == 1.0 else d * self.strength)

    def move_to(self, device=None) -> int:
        if device is not None:
            self.delta = self.delta.to(device)
        return self.delta.nbytes


def patched_model(model, delta: dict[str, Tensor], strength: float = 1.0, sampling: str = "patch"):
    """A clone of ``model`` carrying ``delta`` (names relative to the U-Net), as ``sampling`` says
    (:data:`SAMPLING`)."""
    out = model.clone()
    shapes = {n: tuple(p.shape) for n, p in model.model.diffusion_model.named_parameters()}
    unmatched = [n for n, t in delta.items() if shapes.get(n) != tuple(t.shape)]
    if unmatched:
        raise NodeInputError("delta", f"{len(unmatched)} tensors do not match this model (e.g. {unmatched[0]})",
                             "Apply the delta to the SD1.5 model it was trained on")
    if sampling == "exact":
        for name, t in delta.items():
            out.add_weight_wrapper(PATCH_PREFIX + name, ExactDelta(t, strength))
        out.set_model_compute_dtype(torch.float32)
    else:
        out.add_patches({PATCH_PREFIX + name: ("diff", (t,)) for name, t in delta.items()}, strength)
    return out


@torch.no_grad()
def patch_loss(unet: nn.Module, delta: dict[str, Tensor], storage: torch.dtype, strength: float = 1.0) -> float:
    """How much of ``delta`` ComfyUI's diff patch loses on ``unet`` stored in ``storage``:
    ``||applied - delta|| / ||delta||``.

    The patch adds the delta to the weights as stored and rounds the sum to the storage dtype
    (round to nearest for fp16 and bf16), so in fp16 a delta smaller than the weights' rounding
    step partly vanishes.  Computed on up to 65536 values per tensor drawn at random (a fixed
    generator; a strided sample is biased by the layout of conv kernels): about 45M values on
    SD1.5, a second on a CPU."""
    g = torch.Generator().manual_seed(0)
    err = norm = 0.0
    for name, p in unet.named_parameters():
        if name not in delta:
            continue
        flat, d = p.detach().reshape(-1), delta[name].reshape(-1)
        scale = 1.0  # each sample stands for its tensor's share of ||delta||^2
        if flat.numel() > 65536:
            pick = torch.randint(flat.numel(), (65536,), generator=g)
            flat, d, scale = flat[pick.to(flat.device)], d[pick.to(d.device)], flat.numel() / 65536
        w = flat.to("cpu", storage).float()
        d = d.float().cpu() * strength
        applied = (w + d).to(storage).float() - w
        err += scale * float((applied - d).square().sum())
        norm += scale * float(d.square().sum())
    return (err / norm) ** 0.5 if norm > 0 else 0.0


def sampling_note(model, delta: dict[str, Tensor], strength: float, sampling: str) -> str | None:
    """The node's note when the diff patch loses more than 1% of the delta, with the fix."""
    if sampling == "exact":
        return None
    loss = patch_loss(model.model.diffusion_model, delta, model.model_dtype(), strength)
    if loss <= 0.01:
        return None
    dtype = str(model.model_dtype()).removeprefix("torch.")
    return (f"sampling: ComfyUI adds the delta to the {dtype} weights, which loses {loss:.1%} of it; "
            f"set sampling=exact to add it after the cast, in fp32 (slower sampling)")
