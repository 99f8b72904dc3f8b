"""The toy's diffusion model: the cosine noise schedule and the conditional eps-MLP, and the
``sum_sq`` lambda that matches ``mean_sq``'s strength on it."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .data import N_CLASSES

T = 100  # diffusion steps


def cosine_betas(steps: int = T, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: ``beta_t = 1 - abar(t+1)/abar(t)``, clipped at 0.999."""
    ts = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((ts + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


def alphas_cumprod(betas: Tensor) -> Tensor:
    return torch.cumprod(1 - betas, dim=0)


class ToyEpsModel(nn.Module):
    """``eps_theta(x_t, t, c)``: class and time embeddings concatenated to the point, 2 hidden layers."""

    def __init__(self, hidden: int = 96, emb: int = 8) -> None:
        super().__init__()
        self.class_emb = nn.Embedding(N_CLASSES, emb)
        self.time_emb = nn.Embedding(T, emb)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * emb, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.net(torch.cat([x, self.class_emb(c), self.time_emb(t)], dim=1))



def parameter_shapes() -> dict[str, tuple[int, ...]]:
    """The toy model's parameter tensors and their shapes (what ``L_lip`` sums over)."""
    return {name: tuple(p.shape) for name, p in ToyEpsModel().named_parameters()}


def matched_sum_sq_scale() -> float:
    """``lambda_sum_sq / lambda_mean_sq`` at equal overall strength: tensors / parameters.

    ``mean_sq`` weighs an element of tensor ``i`` by ``1 / n_i``, ``sum_sq`` weighs every element
    by 1.  Averaged over all ``N`` elements, ``mean_sq``'s weight is ``(number of tensors) / N``,
    so ``lambda_sum = lambda_mean * tensors / N`` gives both the same ``lambda * L_lip`` for a
    delta whose squared entries are spread evenly over all parameters (and the same total
    weight ``sum_elements lambda * w``); only how that weight is split between tensors differs.
    For the toy: 8 tensors, 12178 parameters, scale 1/1522.
    """
    shapes = parameter_shapes()
    return len(shapes) / sum(math.prod(s) for s in shapes.values())
