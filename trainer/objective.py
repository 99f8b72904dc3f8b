"""The paper's objective: ``L = L_denoise + lambda * L_lip``, for every kind of delta.

``L_lip = sum_i mean((theta_i - theta0_i)^2)`` over parameter tensors ``i`` (the reference
code's per-tensor ``F.mse_loss``), so ``lambda = 500`` means what it means there.  ``L_lip``
depends on the delta ``theta - theta0`` alone and its gradient is known in closed form, so no
autograd graph is built for it: :meth:`Regularizer.add_grad_` adds ``lambda * dL_lip/dx`` to
the gradients that backpropagation of ``L_denoise`` left in the trainable tensors ``x``,
before the optimizer step.  Adam then sees exactly the gradient of the paper's summed loss.

The gradient of tensor ``i`` is ``2 delta_i / n_i`` (``mean_sq``), ``2 delta_i`` (``sum_sq``)
or ``sign(delta_i) / n_i`` (``l1``): for the L2 kinds Adam applies it as its weight decay
(:meth:`Regularizer.weight_decay`), for ``l1`` it is added with one ``torch._foreach_add_`` per
group of equal-sized tensors.

:func:`paper_regularizer` is the autograd formulation, the ground truth of the tests.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import REGULARIZERS, ConfigError, RegularizerKind
from .delta import ParameterDelta


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient is NaN/inf; raised before the optimizer step touches the delta."""


class Regularizer:
    """``L_lip`` of one kind: its value and its closed-form gradient."""

    def __init__(self, kind: RegularizerKind = "mean_sq") -> None:
        if kind not in REGULARIZERS:
            raise ConfigError("regularizer", f"unknown kind {kind!r}", f"Use one of {', '.join(REGULARIZERS)}")
        self.kind = kind
        self._weights: dict[int, Tensor] = {}

    def weight(self, numel: int) -> float:
        """The per-tensor factor: ``1 / n_i`` for the per-tensor means, 1 for the plain sum."""
        return 1.0 if self.kind == "sum_sq" else 1.0 / numel

    # -- value ------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, delta: ParameterDelta) -> tuple[Tensor, Tensor]:
        """``(L_lip, ||delta||)`` as 0-d tensors on the delta's device: a handful of kernels
        (one foreach norm over all tensors, then vector ops on the per-tensor norms), no sync."""
        tensors = delta.tensors()
        sq = torch.stack(torch._foreach_norm(tensors)).float().square()
        weights = self._weights.get(id(delta))
        if weights is None:
            weights = torch.tensor([self.weight(t.numel()) for t in tensors], device=sq.device)
            self._weights[id(delta)] = weights
        per_tensor = torch.stack(torch._foreach_norm(tensors, 1)).float() if self.kind == "l1" else sq
        return (per_tensor * weights).sum(), sq.sum().sqrt()

    # -- gradient ---------------------------------------------------------------------------
    @torch.no_grad()
    def add_grad_(self, delta: ParameterDelta, lam: float) -> None:
        """``grad += lam * dL_lip/dx`` for every trainable tensor ``x`` of ``delta``."""
        if lam != 0:
            self.add_tensor_grads_(delta.tensors(), delta.grads(), lam)

    def coefficient(self, numel: int, lam: float) -> float:
        """``c_i`` of ``lam * dL_lip/d(delta_i) = c_i * delta_i`` (L2 kinds) or ``c_i * sign(delta_i)`` (l1)."""
        return (lam if self.kind == "l1" else 2.0 * lam) * self.weight(numel)

    def weight_decay(self, delta: ParameterDelta, lam: float) -> list[float] | None:
        """Per-tensor coefficients when the closed form is Adam's own (coupled) weight decay.

        For the L2 kinds on the full delta, ``lam * dL_lip/d(delta_i) = c_i delta_i`` is exactly
        what ``torch.optim.Adam(weight_decay=c_i)`` adds to the gradient inside its kernel, so
        the optimizer can apply the regularizer with no pass of ours over the deltas.  ``None``
        for ``l1``, whose gradient is not proportional to the delta.
        """
        if self.kind == "l1":
            return None
        return [self.coefficient(b.numel(), lam) for b in delta.base.values()]

    @torch.no_grad()
    def add_tensor_grads_(self, deltas: Sequence[Tensor], grads: Sequence[Tensor], lam: float) -> None:
        """The full-delta closed form, allocation-free for the L2 kinds.

        Tensors that share a coefficient (equal element count for the per-tensor kinds) take
        one ``_foreach_add_`` call per group, so the cost is a few fused passes over the deltas,
        independent of how many tensors the model has.
        """
        if lam == 0 or not deltas:
            return
        sources = torch._foreach_sign(list(deltas)) if self.kind == "l1" else list(deltas)
        groups: dict[int, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for d, s, g in zip(deltas, sources, grads):
            key = 1 if self.kind == "sum_sq" else d.numel()
            groups[key][0].append(g)
            groups[key][1].append(s)
        for key, (gs, ss) in groups.items():
            torch._foreach_add_(gs, ss, alpha=self.coefficient(key, lam))


def paper_regularizer(
    params: Sequence[Tensor], params0: Sequence[Tensor], kind: RegularizerKind = "mean_sq"
) -> Tensor:
    """``L_lip`` as the paper's reference code writes it, through autograd.

    ``sum_i F.mse_loss(theta_i, theta0_i)`` (or the ``sum_sq``/``l1`` variants).  The tests'
    ground truth for the closed form, and the benchmark's naive cost.
    """
    Regularizer(kind)
    total = torch.zeros((), device=params[0].device if params else None)
    for p, p0 in zip(params, params0):
        p0 = p0.detach().to(p.dtype)
        if kind == "mean_sq":
            total = total + F.mse_loss(p, p0)
        elif kind == "sum_sq":
            total = total + F.mse_loss(p, p0, reduction="sum")
        else:
            total = total + F.l1_loss(p, p0)
    return total


def denoise_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """``L_denoise = ||eps - eps_theta||^2`` as a mean over elements (the reference MSE)."""
    return F.mse_loss(eps_pred.float(), eps.float())
