"""The paper's objective: ``L = L_denoise + lambda * L_lip``.

``L_lip = sum_i mean((theta_i - theta0_i)^2)`` over parameter tensors ``i`` (the reference
code's per-tensor ``F.mse_loss``), so ``lambda = 500`` means what it means there.  Because
``L_lip`` depends on the delta ``theta - theta0`` alone and its gradient is known in closed
form, we never build an autograd graph over all parameters for it: :meth:`Regularizer.add_grad_`
adds ``lambda * dL_lip/d(delta)`` to the gradients that backpropagation of ``L_denoise``
left, with ``torch._foreach_*`` kernels, before the optimizer step.  The optimizer then sees
exactly the gradient of the paper's summed loss (coupled, inside Adam).
:func:`paper_regularizer` is the autograd formulation, kept as the reference the tests and
the benchmark compare against.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RegularizerKind = Literal["mean_sq", "sum_sq", "l1"]
KINDS: tuple[str, ...] = ("mean_sq", "sum_sq", "l1")


class Regularizer:
    """``L_lip`` of one kind, its value and its closed-form gradient.

    * ``mean_sq`` (default, the paper): ``sum_i mean(delta_i^2)``, gradient ``2 delta_i / n_i``.
    * ``sum_sq``: ``sum_i sum(delta_i^2)``, gradient ``2 delta_i``.
    * ``l1``: ``sum_i mean(|delta_i|)`` (per-tensor ``F.l1_loss``), gradient ``sign(delta_i) / n_i``.
    """

    def __init__(self, kind: RegularizerKind = "mean_sq") -> None:
        if kind not in KINDS:
            raise ValueError(f"regularizer kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind

    def per_tensor_norms(self, deltas: Sequence[Tensor]) -> list[Tensor]:
        """L2 norm of every delta tensor (one foreach pass; shared by value and metrics)."""
        return list(torch._foreach_norm(list(deltas)))

    def value(self, deltas: Sequence[Tensor], norms: Sequence[Tensor] | None = None) -> Tensor:
        """``L_lip`` as a 0-d tensor without an autograd graph.

        ``norms`` may carry :meth:`per_tensor_norms` already computed for the metrics.
        """
        deltas = list(deltas)
        if not deltas:
            return torch.zeros(())
        with torch.no_grad():
            if self.kind == "l1":
                l1 = torch._foreach_norm(deltas, 1)
                terms = [n / d.numel() for n, d in zip(l1, deltas)]
            else:
                norms = list(norms) if norms is not None else self.per_tensor_norms(deltas)
                if self.kind == "mean_sq":
                    terms = [n.float().square() / d.numel() for n, d in zip(norms, deltas)]
                else:
                    terms = [n.float().square() for n in norms]
            return torch.stack([t.float().to(terms[0].device) for t in terms]).sum()

    @torch.no_grad()
    def add_grad_(self, deltas: Sequence[Tensor], grads: Sequence[Tensor], lam: float) -> None:
        """``grads_i += lam * dL_lip/d(delta_i)`` in place, allocation-free for the L2 kinds.

        Tensors that share a coefficient (same element count for the per-tensor mean) are
        updated by one ``_foreach_add_`` call each, so the cost is a few fused passes over the
        deltas, independent of how many tensors the model has.
        """
        if lam == 0 or not deltas:
            return
        if self.kind == "sum_sq":
            torch._foreach_add_(list(grads), list(deltas), alpha=2.0 * lam)
            return
        sources = list(deltas) if self.kind == "mean_sq" else torch._foreach_sign(list(deltas))
        factor = 2.0 * lam if self.kind == "mean_sq" else lam
        groups: dict[int, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for d, s, g in zip(deltas, sources, grads):
            groups[d.numel()][0].append(g)
            groups[d.numel()][1].append(s)
        for numel, (gs, ss) in groups.items():
            torch._foreach_add_(gs, ss, alpha=factor / numel)


def paper_regularizer(
    params: Sequence[Tensor], params0: Sequence[Tensor], kind: RegularizerKind = "mean_sq"
) -> Tensor:
    """``L_lip`` written as the paper's reference code writes it, through autograd.

    ``sum_i F.mse_loss(theta_i, theta0_i)`` (or the ``sum_sq``/``l1`` variants).  Used by the
    tests (ground truth for the closed-form gradient) and by the benchmark (the naive cost).
    """
    if kind not in KINDS:
        raise ValueError(f"regularizer kind must be one of {KINDS}, got {kind!r}")
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
