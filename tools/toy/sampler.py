"""Ancestral DDPM sampling of the toy model, and the scores the paper's claims are about:
preservation of the base classes and adaptation to the new one."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .data import DEFAULT_SEED, HIT_RADIUS, N_BASE, N_CLASSES, NEW_CLASS, SAMPLE_SEED, centres, rng_seed
from .model import cosine_betas


@torch.no_grad()
def ddpm_sample(model_fn, labels: Tensor, betas: Tensor, generator: torch.Generator) -> Tensor:
    """Ancestral DDPM sampling (``sigma_t^2 = beta_t``) of one point per entry of ``labels``."""
    betas = betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    x = torch.randn(labels.numel(), 2, generator=generator)
    for t in range(betas.numel() - 1, -1, -1):
        tt = torch.full((labels.numel(),), t, dtype=torch.long)
        eps = model_fn(x, tt, labels)
        coef = float(betas[t] / (1 - abar[t]).sqrt())
        x = (x - coef * eps) / float(alphas[t].sqrt())
        if t > 0:
            x = x + float(betas[t].sqrt()) * torch.randn(x.shape, generator=generator)
    return x


def evaluate(model_fn, samples_per_class: int, seed: int = DEFAULT_SEED) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Sample every class and score it; returns (metrics, x, labels).

    ``preservation[c]``: fraction of class-``c`` samples within :data:`HIT_RADIUS` of class
    ``c``'s centre, for the base classes, with their mean and minimum; ``adaptation``: the same
    for the new class 5 at the origin."""
    labels = torch.arange(N_CLASSES).repeat_interleave(samples_per_class)
    g = torch.Generator().manual_seed(rng_seed(seed, SAMPLE_SEED))
    x = ddpm_sample(model_fn, labels, cosine_betas(), g).float()
    hit = (x - centres()[labels]).norm(dim=1) <= HIT_RADIUS
    per_class = hit.float().reshape(N_CLASSES, samples_per_class).mean(dim=1).tolist()
    preservation = {str(c): per_class[c] for c in range(N_BASE)}
    metrics = {
        "preservation": preservation,
        "preservation_mean": sum(per_class[:N_BASE]) / N_BASE,
        "preservation_min": min(per_class[:N_BASE]),
        "adaptation": per_class[NEW_CLASS],
    }
    return metrics, x, labels
