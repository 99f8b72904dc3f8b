"""A memory-light delta: ``delta_i = B_i A_i`` of rank ``r`` for every weight matrix.

For 8-12 GB cards.  A full fp32 delta of SD1.5's U-Net with its gradient and Adam moments is
about 14 GB; rank-``r`` factors cost ``r * (out + in)`` per weight, so their gradients and
moments are a few percent of that.  Weights with two or more dimensions are factored (a conv
weight ``[out, in, k, k]`` as ``[out, r] @ [r, in*k*k]``); 1-D tensors (biases, norms) keep a
full delta, which is small.  ``B`` starts at zero and ``A`` at ``N(0, 1/fan_in)`` from a seeded
generator, so the run starts at ``theta0`` and is reproducible.

This is *not* the paper's full fine-tune: it restricts the fine-tune to a low-rank subspace.
The regularizer is still the paper's, on the delta itself: ``L_lip = sum_i mean((B_i A_i)^2)``;
its closed-form gradient is in :mod:`trainer.objective`, with the full delta's.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .delta import ParameterDelta, select_base

FACTOR_B, FACTOR_A = ".lora_B", ".lora_A"


class LowRankDelta(ParameterDelta):
    """``theta = theta0 + B A`` per weight (rank ``rank``), full delta for 1-D tensors.

    ``delta`` holds the trainable tensors (``<name>.lora_B``/``.lora_A`` or ``<name>``), so the
    trainer's optimizer, gradients and resume state work as for :class:`ParameterDelta`.
    :meth:`merged_state_dict` gives the full deltas (what a diff patch needs).
    """

    def __init__(self, module: nn.Module, rank: int = 8, include: Callable[[str], bool] | None = None,
                 device: torch.device | str | None = None, seed: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.module = module
        self.rank = rank
        self.base = select_base(module, include)
        g = torch.Generator().manual_seed(seed)
        self.delta = {}
        self.factored: dict[str, tuple[str, str]] = {}
        for name, p in self.base.items():
            dev = device or p.device
            if p.dim() >= 2:
                out, fan_in = p.shape[0], p[0].numel()
                r = min(rank, out, fan_in)
                a = torch.randn(r, fan_in, generator=g, dtype=torch.float32) / math.sqrt(fan_in)
                self.delta[name + FACTOR_B] = torch.zeros(out, r, device=dev).requires_grad_(True)
                self.delta[name + FACTOR_A] = a.to(dev).requires_grad_(True)
                self.factored[name] = (name + FACTOR_B, name + FACTOR_A)
            else:
                self.delta[name] = torch.zeros(p.shape, dtype=torch.float32, device=dev).requires_grad_(True)

    def summed(self, name: str, base: Tensor) -> Tensor:
        if name in self.factored:
            b, a = self.factors(name)
            return base + (b @ a).view(base.shape)
        return base + self.delta[name]

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(B, A)`` of a factored base tensor."""
        b, a = self.factored[name]
        return self.delta[b], self.delta[a]

    @torch.no_grad()
    def sq_norms(self) -> list[Tensor]:
        """``||B_i A_i||_F^2 = tr(A A^T B^T B)`` per base tensor, through ``r x r`` Gram matrices."""
        out = []
        for name in self.base:
            if name in self.factored:
                b, a = self.factors(name)
                out.append(torch.trace((a @ a.T) @ (b.T @ b)).clamp_min(0))
            else:
                out.append(self.delta[name].float().square().sum())
        return out

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """Full fp32 deltas ``B A`` keyed by parameter name (for diff patches / the delta file)."""
        out = {}
        for name, base in self.base.items():
            if name in self.factored:
                b, a = self.factors(name)
                out[name] = (b @ a).view(base.shape).to("cpu", torch.float32)
            else:
                out[name] = self.delta[name].detach().to("cpu", torch.float32, copy=True)
        return out
