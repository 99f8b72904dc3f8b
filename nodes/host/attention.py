"""The attention the training computes: PyTorch's own, whatever kernel ComfyUI samples with.

Imports ComfyUI, never :mod:`trainer`.
"""
from __future__ import annotations

import comfy.ldm.modules.attention
import comfy.model_management


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


def backward_safe_options() -> dict:
    """The ``transformer_options`` every training forward gets: with SageAttention on, an
    ``optimized_attention_override`` that computes PyTorch's attention instead."""
    return {"optimized_attention_override": _backward_safe_attention} if sage_note() else {}
