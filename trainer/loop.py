"""The paper's Algorithm 1: one regularized training step, as a host-independent loop.

The step is the same for SD1.5 and for the 2-D toy: sample ``x0`` (and its condition) from a
data source, draw ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` from the run's own generator, form
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, take the eps-prediction MSE (plus an optional
DreamBooth prior term), backpropagate it into the deltas, then let the update
(:mod:`trainer.optim`) step Adam on the gradient of the paper's summed loss (``lambda *
dL_lip/d(delta)`` in closed form, inside Adam's kernel as its weight decay where it can be).  Data,
timesteps and noise come from one CPU generator seeded with ``config.seed``, so a CPU run is
bitwise reproducible, and a step that fails puts the generator back, so a resumed run
continues exactly.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .delta import ParameterDelta
from .metrics import StepMetrics
from .objective import Regularizer, denoise_loss
from .optim import make_update

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


def q_sample(x0: Tensor, abar_t: Tensor, eps: Tensor) -> Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``abar_t`` broadcast per example."""
    a = abar_t.to(x0.device, torch.float32).reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


class RegularizedTrainer:
    """Owns the delta's update and the run's generator; :meth:`step` is one iteration."""

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
        self.update = make_update(delta, self.regularizer, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0
        self._applied = False

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Keep the delta applied to the model for the block (a run): its hooks are registered
        once instead of at every step; the model is restored on exit."""
        with self.delta.applied(self.checkpoint):
            self._applied = True
            try:
                yield
            finally:
                self._applied = False

    def step(self) -> StepMetrics:
        """One optimizer step; raises :class:`NonFiniteLossError` leaving the delta as it was.

        A step that raises (non-finite loss, an interrupt inside the forward, any error) has
        already drawn its data, timestep and noise: the generator is put back to where the
        last completed step left it, so a saved resume state continues bitwise like an
        uninterrupted run.  An exception a layer raised while backward recomputed it (a
        host's interrupt, checked in every layer, also during the checkpoint recompute) was
        deferred by the delta (:meth:`ParameterDelta.applied`): the step completes - the
        update may already have stepped part of the delta inside backward - and it is raised
        after, the step counted.
        """
        drawn = self.generator.get_state()
        deferred: list[BaseException] = []
        try:
            metrics = self._step(deferred)
        except BaseException:
            self.generator.set_state(drawn)
            raise
        if deferred:
            raise deferred[0]
        return metrics

    def _step(self, deferred: list[BaseException]) -> StepMetrics:
        start = time.perf_counter()
        c = self.config
        self.update.zero_grad()
        applied = contextlib.nullcontext() if self._applied else self.delta.applied(self.checkpoint)
        with applied, self.delta.deferring(deferred):
            with self._precision():
                denoise = self._denoise(self.data)
                prior = self._denoise(self.prior) if self.prior is not None else None
                loss = denoise if prior is None else denoise + c.prior_weight * prior
            self.update.begin(loss)  # the step's finiteness flag starts with the loss's, on the device
            loss.backward()
        bad = self.update.step(self.step_count + 1)
        lip, delta_norm = self.regularizer.measure(self.delta)
        no_prior = torch.zeros((), device=denoise.device)
        # One device-to-host copy for every metric and the finiteness flag (a single sync).
        loss_v, denoise_v, prior_v, lip_v, norm_v, bad_v = torch.stack(
            [loss.detach(), denoise.detach(), (prior if prior is not None else no_prior).detach(),
             lip.to(denoise.device), delta_norm.to(denoise.device), bad.to(denoise.device)]).tolist()
        if bad_v:
            raise self.update.non_finite(self.step_count + 1)
        self.step_count += 1
        return StepMetrics(
            step=self.step_count, total=c.steps, loss=loss_v + c.lam * lip_v, denoise=denoise_v,
            prior=None if prior is None else prior_v, lip=lip_v, delta_norm=norm_v,
            seconds=time.perf_counter() - start)

    def _denoise(self, source: DataSource) -> Tensor:
        """``||eps - eps_theta(x_t, t, c)||^2`` on one batch drawn from ``source``."""
        x0, cond = source.sample(self.generator)
        t = torch.randint(self.abar.numel(), (x0.shape[0],), generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(x0.device)
        x_t = q_sample(x0.float(), self.abar[t], eps)
        return denoise_loss(self.model_fn(x_t, t.to(x0.device), cond), eps)

    def _precision(self) -> contextlib.AbstractContextManager:
        """``precision="bf16"``: the forward (and so the backward) computes in bf16 autocast."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.delta.tensors()[0].device.type, dtype=torch.bfloat16)

    # -- resume ---------------------------------------------------------------------------
    def state_dict(self, with_delta: bool = True) -> dict[str, Any]:
        """Everything a bitwise-exact resume needs: deltas, Adam state, generator, step
        (``with_delta=False``: all but the deltas, for a caller that stores them itself)."""
        return {
            "delta": self.delta.state_dict() if with_delta else {},
            "optimizer": self.update.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The optimizer keeps the tensors it is given and updates them in place: copy, so the
        # same saved state can be loaded twice (or shared with another process) unharmed.
        state = copy.deepcopy(state)
        self.delta.load_state_dict(state["delta"])
        self.update.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
