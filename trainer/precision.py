"""TF32 as a stated choice: strict fp32 matmuls and convolutions unless the run asks for TF32.

PyTorch's defaults differ by op (cuDNN convolutions may use TF32, cuBLAS matmuls may not) and any
other code in the process may change them, so "fp32" would mean whatever the host left behind.
Every host (the node, the benchmarks) trains inside :func:`tf32_as_configured`, which sets both
flags from :attr:`trainer.config.TrainConfig.tf32` and restores the previous values after, even
when the run stops with an error or an interrupt.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def tf32_flags() -> tuple[bool, bool]:
    """``(cuBLAS matmuls, cuDNN convolutions)``: whether each may use TF32 now."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set(matmul: bool, conv: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = conv


@contextlib.contextmanager
def tf32_as_configured(tf32: bool) -> Iterator[None]:
    """Matmuls and convolutions in TF32 where ``tf32``, else strict fp32; the flags as they
    were afterwards."""
    saved = tf32_flags()
    _set(tf32, tf32)
    try:
        yield
    finally:
        _set(*saved)
