"""The toy's data: five Gaussian classes on a pentagon and a new one at the origin, and the
batches the trainer draws from them.  Every random draw comes from its own seeded stream."""
from __future__ import annotations

import math

import torch
from torch import Tensor

N_BASE = 5
NEW_CLASS = 5
N_CLASSES = 6
POINTS_PER_CLASS = 1000
STD = 0.5
RADIUS = 3.0
HIT_RADIUS = 1.5  # a sample "hits" its class within this distance of the class centre
BATCH = 512
DEFAULT_SEED = 0
# Offsets from the run's seed of the independent random streams.
DATA_SEED, MODEL_SEED, PRETRAIN_SEED, FINETUNE_SEED, SAMPLE_SEED = 0, 1, 2, 3, 4


def rng_seed(seed: int, stream: int) -> int:
    """The generator seed of one random stream of one run."""
    return 1000 * seed + stream


def centres() -> Tensor:
    """``(6, 2)``: the pentagon's vertices (class 0 on top, counter-clockwise), then the origin."""
    angles = torch.arange(N_BASE, dtype=torch.float64) * (2 * math.pi / N_BASE) + math.pi / 2
    base = RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return torch.cat([base, torch.zeros(1, 2, dtype=torch.float64)]).float()


def make_points(seed: int = DEFAULT_SEED) -> tuple[Tensor, Tensor]:
    """1000 points per class for all six classes: ``x (6000, 2)``, ``labels (6000,)``."""
    g = torch.Generator().manual_seed(rng_seed(seed, DATA_SEED))
    labels = torch.arange(N_CLASSES).repeat_interleave(POINTS_PER_CLASS)
    x = centres()[labels] + STD * torch.randn(labels.numel(), 2, generator=g)
    return x, labels



class EpochBatches:
    """A ``DataSource`` of the trainer's loop that walks shuffled epochs in batches (last one short).

    Each epoch is a fresh permutation drawn from the trainer's generator, so ``steps =
    epochs * ceil(n / batch_size)`` trainer steps are exactly ``epochs`` passes over the data.
    """

    def __init__(self, x0: Tensor, cond: Tensor, batch_size: int = BATCH) -> None:
        if x0.shape[0] == 0 or x0.shape[0] != cond.shape[0]:
            raise ValueError("need as many conditions as (at least one) examples")
        self.x0, self.cond, self.batch_size = x0, cond, batch_size
        self._batches: list[Tensor] = []

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.x0.shape[0] / self.batch_size)

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if not self._batches:
            perm = torch.randperm(self.x0.shape[0], generator=generator)
            self._batches = list(perm.split(self.batch_size))
        idx = self._batches.pop(0)
        return self.x0[idx], self.cond[idx]
