"""One regularized training step of the paper's Algorithm 1, and what it reports.

The step is the same for SD1.5 and for the 2-D toy: sample ``x0`` (and its condition) from a
data source, draw ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` from the run's own generator, form
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, take the eps-prediction MSE (plus an optional
DreamBooth prior term), backpropagate it into the deltas, add ``lambda * dL_lip/d(delta)`` in
closed form, and step Adam.  Data, timesteps and noise come from one CPU generator seeded with
``config.seed``, so a CPU run is bitwise reproducible.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from .delta import ParameterDelta
from .objective import Regularizer, RegularizerKind, denoise_loss

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
"""``model_fn(x_t, t, cond) -> eps_pred``; ``t`` is a ``long`` tensor of timesteps."""


class DataSource(Protocol):
    """Gives one batch ``(x0, cond)`` per call, drawing randomness only from ``generator``."""

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Any]: ...


@dataclass
class CachedExamples:
    """Latents (or points) and their conditions, cached once; each step draws ``batch_size``.

    ``cond`` holds one condition per example, or a single one shared by all (the instance
    prompt's embedding).  Indices are drawn uniformly with replacement.
    """

    x0: Tensor
    cond: Tensor
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.x0.shape[0] == 0:
            raise ValueError("no training examples")
        if self.cond.shape[0] not in (1, self.x0.shape[0]):
            raise ValueError(f"cond has {self.cond.shape[0]} rows for {self.x0.shape[0]} examples")

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(self.x0.shape[0], (self.batch_size,), generator=generator)
        cond = self.cond.expand(self.x0.shape[0], *self.cond.shape[1:]) if self.cond.shape[0] == 1 else self.cond
        return self.x0[idx.to(self.x0.device)], cond[idx.to(cond.device)]


@dataclass
class TrainConfig:
    """Hyperparameters; the defaults are the paper's reference SD1.5 run."""

    steps: int = 1000
    lr: float = 2e-6
    lam: float = 500.0
    regularizer: RegularizerKind = "mean_sq"
    seed: int = 2025
    prior_weight: float = 1.0

    def validate(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lambda must be a finite number >= 0, got {self.lam!r}")
        if not (math.isfinite(self.prior_weight) and self.prior_weight >= 0):
            raise ValueError(f"prior weight must be a finite number >= 0, got {self.prior_weight!r}")
        Regularizer(self.regularizer)


@dataclass
class StepMetrics:
    """What one step reports. ``lip`` and the norms are of the delta after the step."""

    step: int
    total: int
    loss: float
    denoise: float
    prior: float | None
    lip: float
    delta_norm: float
    block_norms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient is NaN/inf; raised before the optimizer step touches the delta."""


def q_sample(x0: Tensor, abar_t: Tensor, eps: Tensor) -> Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``abar_t`` broadcast per example."""
    a = abar_t.to(x0.device, torch.float32).reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


class RegularizedTrainer:
    """Owns the deltas' optimizer and the run's generator; :meth:`step` does one update."""

    def __init__(
        self,
        model_fn: ModelFn,
        delta: ParameterDelta,
        abar: Tensor,
        data: DataSource,
        config: TrainConfig,
        prior: DataSource | None = None,
        checkpoint: Sequence[nn.Module] = (),
    ) -> None:
        config.validate()
        self.model_fn = model_fn
        self.delta = delta
        self.abar = abar.detach().to("cpu", torch.float64)
        self.data = data
        self.prior = prior
        self.config = config
        self.checkpoint = list(checkpoint)
        self.regularizer = Regularizer(config.regularizer)
        self.optimizer = torch.optim.Adam(delta.tensors(), lr=config.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0

    # -- the step -------------------------------------------------------------------------
    def _denoise(self, source: DataSource) -> Tensor:
        x0, cond = source.sample(self.generator)
        t = torch.randint(self.abar.numel(), (x0.shape[0],), generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(x0.device)
        x_t = q_sample(x0.float(), self.abar[t], eps)
        return denoise_loss(self.model_fn(x_t, t.to(x0.device), cond), eps)

    def step(self) -> StepMetrics:
        """One optimizer step; raises :class:`NonFiniteLossError` leaving the delta as it was."""
        start = time.perf_counter()
        lam = self.config.lam
        self.optimizer.zero_grad(set_to_none=True)
        with self.delta.applied(self.checkpoint):
            denoise = self._denoise(self.data)
            prior = self._denoise(self.prior) if self.prior is not None else None
            loss = denoise if prior is None else denoise + self.config.prior_weight * prior
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at step {self.step_count + 1}: lower the learning rate"
                )
            loss.backward()
        deltas, grads = self.delta.tensors(), self.delta.grads()
        self.regularizer.add_grad_(deltas, grads, lam)
        grad_norm = torch.stack(torch._foreach_norm(grads)).norm()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"gradient became non-finite at step {self.step_count + 1}: lower the learning rate"
            )
        self.optimizer.step()
        self.step_count += 1
        norms = self.regularizer.per_tensor_norms(deltas)
        lip = self.regularizer.value(deltas, norms)
        total_norm = torch.stack(norms).detach().double().norm()
        denoise_v = denoise.item()
        return StepMetrics(
            step=self.step_count,
            total=self.config.steps,
            loss=loss.item() + lam * float(lip),
            denoise=denoise_v,
            prior=None if prior is None else prior.item(),
            lip=float(lip),
            delta_norm=float(total_norm),
            block_norms=self.delta.block_norms(norms),
            seconds=time.perf_counter() - start,
        )

    # -- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bitwise-exact resume needs: deltas, Adam state, generator, step."""
        return {
            "delta": self.delta.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta.load_state_dict(state["delta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
