"""The attention the training computes: PyTorch's own, whatever kernel ComfyUI samples with.

ComfyUI picks one attention function at start-up (``comfy.ldm.modules.attention.optimized_attention``)
from its flags and the machine: SageAttention and FlashAttention (``--use-sage-attention``,
``--use-flash-attention``: kernels, or a ``torch.library`` custom op, with no backward pass),
xformers, Comfy Kitchen's int8 attention (``--use-ck-attention``, current ComfyUI), or the
split / sub-quadratic einsum variants (``--use-split-cross-attention``, ``--use-quad-cross-attention``,
the default where PyTorch's attention is not enabled, e.g. on a CPU).  A kernel without a
backward makes the attention's share of the gradient vanish or the step fail; the others give a
gradient that depends on how ComfyUI was started.  So every training forward passes
``optimized_attention_override`` (honoured by ComfyUI's ``wrap_attn`` in 0.3.75 and current ComfyUI,
before any per-module preferred kernel): PyTorch's scaled-dot-product attention, which has a backward on
every device.  Sampling keeps ComfyUI's choice.

Imports ComfyUI, never :mod:`trainer`.
"""
from __future__ import annotations

import comfy.ldm.modules.attention

# ComfyUI's attention functions by name -> how the node names them (the flag that selects it).
BACKENDS = {
    "attention_sage": "SageAttention (--use-sage-attention), which has no backward pass",
    "attention3_sage": "SageAttention 3, which has no backward pass",
    "attention_flash": "FlashAttention (--use-flash-attention), a custom op with no backward pass",
    "attention_comfy_kitchen_int8": "Comfy Kitchen int8 attention (--use-ck-attention), which has no backward pass",
    "attention_xformers": "xformers attention",
    "attention_split": "split cross attention (--use-split-cross-attention)",
    "attention_sub_quad": "sub-quadratic attention (--use-quad-cross-attention, ComfyUI's default without "
                          "PyTorch attention)",
    "attention_basic": "ComfyUI's basic attention",
}


def replaced_backend() -> str | None:
    """How the node names the attention ComfyUI samples with, where it is not PyTorch's."""
    attention = comfy.ldm.modules.attention
    chosen = attention.optimized_attention
    if chosen is attention.attention_pytorch:
        return None
    name = getattr(chosen, "__name__", type(chosen).__name__)
    return BACKENDS.get(name, f"{name} (a custom attention)")


def attention_note() -> str | None:
    """The node's note when the training replaces ComfyUI's attention."""
    backend = replaced_backend()
    if backend is None:
        return None
    return f"attention: ComfyUI samples with {backend}; the training computes PyTorch's attention instead"


def _pytorch_attention(func, *args, **kwargs):
    """ComfyUI's ``optimized_attention_override``: PyTorch's SDPA in place of ``func``."""
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


def training_options() -> dict:
    """The ``transformer_options`` of every training forward: a fresh dict, as ComfyUI's U-Net
    writes its bookkeeping (shapes, block indices) into the one it is given."""
    return {"optimized_attention_override": _pytorch_attention}
