"""The result: a MODEL clone carrying the delta (ComfyUI's diff patch or the exact weight
wrapper), and how much of the delta the fp16 patch loses.

Works through the patcher API of the MODEL it is given (no ComfyUI import), never :mod:`trainer`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...trainer.files.delta_file import PATCH_PREFIX
from ...trainer.errors import NodeInputError


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
