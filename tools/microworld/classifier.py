"""A small CNN that names a picture's concept (colour + shape, the base model's 12), trained in
seconds on the world's true renders: the judge of whether the base model follows its prompts."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import world


def make() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, len(world.CONCEPTS)))


def train(seed: int = 0, steps: int = 400, batch: int = 48, pool: int = 480) -> nn.Module:
    """Trained on ``pool`` renders drawn once (all positions and sizes the world draws)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = torch.from_numpy(world.render_batch(world.base_items(rng, pool))).permute(0, 3, 1, 2)
    labels = torch.arange(pool) % len(world.CONCEPTS)
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(pool, size=batch, replace=False))
        x, y = images[pick], labels[pick]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[N, 64, 64, 3]`` in [0, 1] -> concept indices into ``world.CONCEPTS``."""
    return model(images[..., :3].permute(0, 3, 1, 2).float()).argmax(1)


def accuracy_on_fresh_renders(model: nn.Module, n: int = 120, seed: int = 99) -> float:
    items = world.base_items(np.random.default_rng(seed), n)
    pred = predict(model, torch.from_numpy(world.render_batch(items)))
    return float((pred == torch.tensor([i % len(world.CONCEPTS) for i in range(n)])).float().mean())
