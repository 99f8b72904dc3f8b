"""Export a trained delta as a LoRA: a truncated SVD of each weight's delta, in kohya's format.

A finished SD1.5 delta is 1.7 GB in fp16; people share and load subjects as LoRAs of tens of
MB.  Like kohya's ``extract_lora_from_models.py``, each weight's delta ``D`` (a conv kernel
``[out, in, kh, kw]`` read as the matrix ``[out, in*kh*kw]``) is replaced by its best rank-``r``
approximation ``up @ down = U_r S_r V_r^T`` (Eckart-Young: the truncated SVD), stored as

* ``lora_unet_<module>.lora_down.weight``: ``[r, in]`` (linear) or ``[r, in, kh, kw]`` (conv),
* ``lora_unet_<module>.lora_up.weight``: ``[out, r]`` or ``[out, r, 1, 1]``,
* ``lora_unet_<module>.alpha``: ``r`` (the loaders scale by ``alpha / r``: 1, the delta as trained),

where ``<module>`` is the module's **diffusers** path with ``_`` for ``.``
(``down_blocks_0_attentions_0_proj_in``), as kohya writes SD1.5 LoRAs: ComfyUI's
``LoraLoaderModelOnly`` maps these names (``comfy.lora.model_lora_keys_unet``), and so does
diffusers' ``load_lora_weights`` (its kohya converter), A1111 and Forge.  The pack's deltas use
ComfyUI's LDM names (``input_blocks.1.1.proj_in``); :func:`diffusers_module` converts.

1-D tensors (biases, group/layer norms) have no low-rank form.  By default they are **dropped**:
diffusers refuses a kohya file with any other key; :class:`LoRAStats` reports the share of the
delta's norm they hold (they count in the relative error).  ``keep_1d=True`` stores them whole as
``lora_unet_<module>.diff`` / ``.diff_b``, which ComfyUI's loader applies (then a full-rank LoRA
is the delta) but diffusers refuses.  Unlike kohya, the factors are not clamped to a quantile:
the error stated is the one a loader applies.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from .files.delta_file import param_name

FORMAT = "lipschitz-lora/1"
LORA_PREFIX = "lora_unet_"

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
       "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}


@dataclass(frozen=True)
class UNetLayout:
    """How LDM's flat ``input_blocks``/``output_blocks`` indices split into diffusers' levels:
    ``levels`` resolutions, ``res_blocks`` resnets per down level (SD1.5: 4 and 2)."""

    levels: int
    res_blocks: int

    @classmethod
    def of(cls, names: Iterable[str]) -> "UNetLayout":
        """Read off a full U-Net's parameter names: level ``k``'s downsampler is
        ``input_blocks.{(k + 1) * (res_blocks + 1)}.0.op``; a one-level U-Net has none."""
        names = list(names)
        downs = sorted({int(m.group(1)) for n in names if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", n))})
        if downs:
            return cls(len(downs) + 1, downs[0] - 1)
        inputs = [int(n.split(".")[1]) for n in names if n.startswith("input_blocks.")]
        if not inputs:
            raise ValueError("no input_blocks.* parameter: not an SD1.5 U-Net delta in ComfyUI's layout")
        return cls(1, max(inputs))


def _resnet(tail: str) -> str:
    for ldm, diffusers in RESNET.items():
        if tail == ldm or tail.startswith(ldm + "."):
            return diffusers + tail[len(ldm):]
    raise KeyError(tail)


def diffusers_module(module: str, layout: UNetLayout) -> str:
    """An LDM module path (``output_blocks.2.1.conv``) -> diffusers' (``up_blocks.0.upsamplers.0.conv``)."""
    for ldm, diffusers in TOP.items():
        if module == ldm:
            return diffusers
    parts = module.split(".")
    if len(parts) < 3:
        raise KeyError(f"{module!r} is not an SD1.5 U-Net module")
    block, index, sub, tail = parts[0], int(parts[1]), parts[2], ".".join(parts[3:])
    per_level = layout.res_blocks + 1
    if block == "middle_block":
        inner, tail = MIDDLE[str(index)], ".".join(parts[2:])
        return f"{inner}.{_resnet(tail) if 'resnets' in inner else tail}"
    if block == "input_blocks" and index > 0:
        level, j = divmod(index - 1, per_level)
        if j == layout.res_blocks:
            return f"down_blocks.{level}.downsamplers.0.conv"  # LDM: input_blocks.N.0.op
        kind = {"0": "resnets", "1": "attentions"}[sub]
        return f"down_blocks.{level}.{kind}.{j}.{_resnet(tail) if kind == 'resnets' else tail}"
    if block == "output_blocks":
        level, j = divmod(index, per_level)
        if sub == "0":
            return f"up_blocks.{level}.resnets.{j}.{_resnet(tail)}"
        if tail == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv"  # LDM: output_blocks.N.{1|2}.conv
        return f"up_blocks.{level}.attentions.{j}.{tail}"
    raise KeyError(f"{module!r} is not an SD1.5 U-Net module")


def lora_name(parameter: str, layout: UNetLayout) -> str:
    """``input_blocks.1.1.proj_in.weight`` (or ``.bias``) -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    module = parameter.rsplit(".", 1)[0]
    return LORA_PREFIX + diffusers_module(module, layout).replace(".", "_")


def delta_from_file(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A delta file's tensors (``diffusion_model.<module>.diff`` / ``.diff_b``, and for a stopped
    run its resume state, ignored) -> U-Net parameter name -> tensor."""
    out = {name: t for key, t in tensors.items() if (name := param_name(key)) is not None}
    if not out:
        raise ValueError("the file holds no diffusion_model.*.diff tensor: not a delta file of this pack")
    return out


@dataclass
class LoRAStats:
    """What the LoRA keeps of the delta: squared Frobenius norms summed over all tensors."""

    rank: int
    factored: int = 0
    dropped: list[str] = field(default_factory=list)  # 1-D tensors left out (keep_1d=False)
    kept_1d: int = 0
    delta_sq: float = 0.0       # ||delta||^2, every tensor
    error_sq: float = 0.0       # ||delta - LoRA||^2 as stored (dropped tensors count in full)
    dropped_sq: float = 0.0     # ||dropped 1-D tensors||^2
    nbytes: int = 0

    @property
    def rel_error(self) -> float:
        """``||delta - LoRA||_F / ||delta||_F`` over the whole delta."""
        return math.sqrt(self.error_sq / self.delta_sq) if self.delta_sq else 0.0

    @property
    def dropped_fraction(self) -> float:
        """The share of ``||delta||_F`` that the dropped biases and norms hold."""
        return math.sqrt(self.dropped_sq / self.delta_sq) if self.delta_sq else 0.0

    def metadata(self) -> dict[str, str]:
        return {"rank": str(self.rank), "rel_frobenius_error": f"{self.rel_error:.6g}",
                "dropped_1d_tensors": str(len(self.dropped)), "kept_1d_tensors": str(self.kept_1d),
                "dropped_norm_fraction": f"{self.dropped_fraction:.6g}"}


def factorize(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` approximation of ``delta`` (2-D, or a conv kernel read as
    ``M = [out, in*kh*kw]``) as fp32 ``(up, down)`` in the loaders' shapes; the rank is capped at
    ``min(out, in*kh*kw)``, where the product is ``delta`` itself.

    The truncated SVD ``U_r S_r V_r^T`` through the eigenvectors of the smaller Gram matrix
    (``M M^T`` or ``M^T M``, in fp64): ``up @ down = U_r U_r^T M = M V_r V_r^T``.  One matrix
    product and an eigendecomposition of at most 1280 x 1280 for SD1.5, about ten times faster
    on a CPU than LAPACK's SVD of the 1280 x 11520 kernels, and exact to fp64 rounding for every
    singular value above ``1e-8`` of the largest (fp16 storage resolves far less).
    """
    out_dim = delta.shape[0]
    m = delta.reshape(out_dim, -1).double()
    wide = m.shape[0] <= m.shape[1]
    _, vectors = torch.linalg.eigh(m @ m.T if wide else m.T @ m)  # eigenvalues ascending: S^2
    r = min(rank, vectors.shape[0])
    top = vectors[:, -r:].flip(1)                                 # U_r (wide) or V_r, largest first
    up, down = (top, top.T @ m) if wide else (m @ top, top.T)
    up, down = up.float().contiguous(), down.float().contiguous()
    return up.reshape(out_dim, r, *([1] * (delta.dim() - 2))), down.reshape(r, *delta.shape[1:])


def lora_nbytes(shapes: Iterable[tuple[int, ...]], rank: int, dtype: torch.dtype = torch.float16,
                keep_1d: bool = False) -> int:
    """What :func:`extract_lora` will write for tensors of ``shapes`` (the disk check before it):
    ``r (out + in*kh*kw)`` values per weight, ``r = min(rank, out, in*kh*kw)``, and an alpha."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes:
        if len(shape) >= 2:
            out_dim, fan_in = shape[0], math.prod(shape[1:])
            total += min(rank, out_dim, fan_in) * (out_dim + fan_in) * size + 4
        elif keep_1d:
            total += math.prod(shape) * size
    return total


Progress = Callable[[int, int, str], None]


def extract_lora(delta: Mapping[str, Tensor], rank: int, dtype: torch.dtype = torch.float16,
                 keep_1d: bool = False, progress: Progress | None = None) -> tuple[dict[str, Tensor], LoRAStats]:
    """``delta`` (U-Net parameter name in ComfyUI's LDM layout -> tensor) -> kohya LoRA tensors
    in ``dtype`` and what they keep.  One tensor at a time: besides the output, only the tensor
    being factored and its factors are held (SD1.5's largest, 1280 x 23040, in fp64: 240 MB).  ``keep_1d``: biases
    and norms as ``.diff``/``.diff_b`` (ComfyUI only) instead of dropped.  ``progress(i, n,
    name)`` is called after each tensor."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    layout = UNetLayout.of(delta)
    lora: dict[str, Tensor] = {}
    stats = LoRAStats(rank)
    for i, (name, d) in enumerate(delta.items(), 1):
        sq = float(d.float().square().sum())
        stats.delta_sq += sq
        if d.dim() < 2 and keep_1d:
            kept = d.to(dtype)
            lora[f"{lora_name(name, layout)}.{'diff' if name.endswith('.weight') else 'diff_b'}"] = kept
            stats.error_sq += float((d.float() - kept.float()).square().sum())
            stats.kept_1d += 1
        elif d.dim() < 2:
            stats.dropped.append(name)
            stats.dropped_sq += sq
            stats.error_sq += sq
        else:
            up, down = (f.to(dtype) for f in factorize(d, rank))
            key = lora_name(name, layout)
            residual = d.reshape(d.shape[0], -1).float() - up.float().flatten(1) @ down.float().flatten(1)
            stats.error_sq += float(residual.square().sum())
            del residual
            lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"] = up, down
            lora[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
            stats.factored += 1
        if progress is not None:
            progress(i, len(delta), name)
    stats.nbytes = sum(t.numel() * t.element_size() for t in lora.values())
    return lora, stats


def kohya_metadata(stats: LoRAStats, source: str, base_fingerprint: str) -> dict[str, str]:
    """The file's metadata: ours (rank, error, source run, base) and the ``ss_*`` fields kohya
    writes, which A1111/Forge and LoRA browsers show."""
    return {**stats.metadata(), "format": FORMAT, "source": source, "base_fingerprint": base_fingerprint,
            "ss_network_module": "networks.lora", "ss_network_dim": str(stats.rank),
            "ss_network_alpha": str(stats.rank), "ss_base_model_version": "sd_v1",
            "ss_network_args": '{"extracted_from": "lipschitz delta, truncated SVD"}'}
