"""One regularized training step of the paper's Algorithm 1, and what it reports.

The step is the same for SD1.5 and for the 2-D toy: sample ``x0`` (and its condition) from a
data source, draw ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` from the run's own generator, form
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, take the eps-prediction MSE (plus an optional
DreamBooth prior term), backpropagate it into the deltas, add ``lambda * dL_lip/d(delta)`` in
closed form, and step Adam.  Data, timesteps and noise come from one CPU generator seeded with
``config.seed``, so a CPU run is bitwise reproducible.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
from torch import Tensor, nn

from .delta import ParameterDelta
from .objective import Regularizer, RegularizerKind, denoise_loss
from .optim import ADAM_IMPLS, AdamImpl, StepInBackward, make_adam

Autocast = Literal["off", "bf16", "fp16"]
AUTOCASTS: tuple[str, ...] = ("off", "bf16", "fp16")

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
    # Speed/memory options (docs/performance.md); every default is the faithful fp32 path.
    autocast: Autocast = "off"
    """Forward in bf16/fp16 autocast; the deltas, their gradients and Adam stay fp32.
    ``fp16`` adds dynamic loss scaling (a step whose gradient overflows is skipped)."""
    adam: AdamImpl = "default"
    """Adam implementation (:mod:`trainer.optim`); ``8bit`` needs bitsandbytes."""
    sync_metrics: bool = True
    """``False``: no host synchronisation in :meth:`RegularizedTrainer.step`; metrics are
    copied to the host asynchronously (read them with ``StepMetrics.resolve()``/``as_dict()``),
    a non-finite step is skipped on the device by fused Adam and reported one step later.
    Needs ``adam="fused"``."""
    step_in_backward: bool = False
    """Step each tensor's Adam as soon as its gradient is complete and free the gradient
    (:class:`trainer.optim.StepInBackward`): one parameter-sized buffer less at the peak.
    A non-finite gradient is detected after backward, when some tensors already stepped."""
    channels_last: bool = False
    """Feed ``x_t`` in channels_last (convert the model with ``.to(memory_format=...)`` too)."""

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
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {AUTOCASTS}, got {self.autocast!r}")
        if self.adam not in ADAM_IMPLS:
            raise ValueError(f"adam must be one of {ADAM_IMPLS}, got {self.adam!r}")
        if not self.sync_metrics and (self.adam != "fused" or self.step_in_backward or self.autocast == "fp16"):
            raise ValueError("sync_metrics=False needs adam='fused' (its on-device skip of a non-finite step), "
                             "without step_in_backward or fp16 loss scaling")
        if self.step_in_backward and self.autocast == "fp16":
            raise ValueError("step_in_backward cannot be combined with fp16 loss scaling")


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
    _pending: Callable[["StepMetrics"], None] | None = field(default=None, repr=False, compare=False)

    def resolve(self) -> "StepMetrics":
        """Fill the values of a ``sync_metrics=False`` step (waits for that step only)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending(self)
        return self

    def as_dict(self) -> dict[str, Any]:
        self.resolve()
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}


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
        self.optimizer: Any
        if config.step_in_backward and not delta.supports_step_in_backward:
            raise ValueError(f"step_in_backward works with the full ParameterDelta, not {type(delta).__name__}")
        if config.step_in_backward:
            self.optimizer = StepInBackward(delta.tensors(), config.lr, config.adam, self._add_reg_grad_one)
        else:
            self.optimizer = make_adam(delta.tensors(), config.lr, config.adam)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0
        self.loss_scale = 2.0**16 if config.autocast == "fp16" else 1.0
        self._pending_bad: Tensor | None = None
        self._bad_flag: Tensor | None = None

    # -- options --------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.autocast == "off":
            return contextlib.nullcontext()
        device = self.delta.tensors()[0].device.type
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast(device, dtype=dtype)

    def _add_reg_grad_one(self, d: Tensor, g: Tensor) -> None:
        """Step-in-backward: ``lambda * dL_lip/d(delta)`` for one tensor, then its finiteness."""
        self.regularizer.add_grad_([d], [g], self.config.lam)
        bad = ~torch.isfinite(g).all()
        self._bad_flag = bad if self._bad_flag is None else self._bad_flag | bad

    # -- the step -------------------------------------------------------------------------
    def _denoise(self, source: DataSource) -> Tensor:
        x0, cond = source.sample(self.generator)
        t = torch.randint(self.abar.numel(), (x0.shape[0],), generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(x0.device)
        x_t = q_sample(x0.float(), self.abar[t], eps)
        if self.config.channels_last and x_t.dim() == 4:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return denoise_loss(self.model_fn(x_t, t.to(x0.device), cond), eps)

    def step(self) -> StepMetrics:
        """One optimizer step; raises :class:`NonFiniteLossError` leaving the delta as it was.

        A step that raises (non-finite loss, an interrupt inside the forward, any error) has
        already drawn its data, timestep and noise: the generator is put back to where the
        last completed step left it, so a saved resume state continues bitwise like an
        uninterrupted run.
        """
        drawn = self.generator.get_state()
        try:
            return self._step()
        except BaseException:
            self.generator.set_state(drawn)
            raise

    def _step(self) -> StepMetrics:
        start = time.perf_counter()
        c, lam = self.config, self.config.lam
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_flag = None
        with self.delta.applied(self.checkpoint):
            with self._autocast():
                denoise = self._denoise(self.data)
                prior = self._denoise(self.prior) if self.prior is not None else None
                loss = denoise if prior is None else denoise + c.prior_weight * prior
            if c.sync_metrics and not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at step {self.step_count + 1}: lower the learning rate"
                )
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        if not c.sync_metrics:
            self._check_previous_step()
        skipped = False
        if c.step_in_backward:
            self.optimizer.finish()
            if bool(self._bad_flag):
                raise NonFiniteLossError(
                    f"gradient became non-finite at step {self.step_count + 1}: lower the learning rate "
                    "(step_in_backward: tensors reached before it were already updated)"
                )
        else:
            grads = self.delta.grads()
            if self.loss_scale != 1.0:
                torch._foreach_mul_(grads, 1.0 / self.loss_scale)
            self.delta.add_regularizer_grad_(self.regularizer, lam)
            grad_norm = torch.stack(torch._foreach_norm(grads)).norm()
            if c.sync_metrics:
                if not torch.isfinite(grad_norm):
                    if self.loss_scale != 1.0:  # fp16 overflow: skip this step, scale down
                        self.loss_scale /= 2.0
                        skipped = True
                    else:
                        self.optimizer.zero_grad(set_to_none=True)
                        raise NonFiniteLossError(
                            f"gradient became non-finite at step {self.step_count + 1}: lower the learning rate"
                        )
                if not skipped:
                    self.optimizer.step()
            else:
                bad = (~torch.isfinite(loss.detach())) | (~torch.isfinite(grad_norm))
                self.optimizer.found_inf = bad.float()
                self.optimizer.grad_scale = None
                self.optimizer.step()
                self._pending_bad = bad
        self.step_count += 1
        lip, norms = self.delta.lip_and_norms(self.regularizer)
        if not c.sync_metrics:
            return self._lazy_metrics(loss, denoise, prior, lip, norms, start)
        return StepMetrics(
            step=self.step_count,
            total=c.steps,
            loss=loss.item() + lam * float(lip),
            denoise=denoise.item(),
            prior=None if prior is None else prior.item(),
            lip=float(lip),
            delta_norm=float(torch.stack(norms).detach().double().norm()),
            block_norms=self.delta.block_norms(norms),
            seconds=time.perf_counter() - start,
        )

    def _check_previous_step(self) -> None:
        """No-sync mode: the previous step's finiteness flag, read after this step's backward
        was queued (the device is past it by then, so this does not stall it)."""
        bad, self._pending_bad = self._pending_bad, None
        if bad is not None and bool(bad):
            # Fused Adam skipped that step on the device: the delta is the one before it.
            self.step_count -= 1
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"loss or gradient became non-finite at step {self.step_count + 1}: lower the learning rate"
            )

    def finish(self) -> None:
        """End of a run: surface a non-finite last step of a ``sync_metrics=False`` run."""
        if self._pending_bad is not None:
            self._check_previous_step()

    def _lazy_metrics(self, loss: Tensor, denoise: Tensor, prior: Tensor | None, lip: Tensor,
                      norms: list[Tensor], start: float) -> StepMetrics:
        """Queue one device-to-host copy of every metric; the values are read on demand."""
        with torch.no_grad():
            norms_t = torch.stack([n.float() for n in norms])
            parts = [loss.detach().float().reshape(1), denoise.detach().float().reshape(1),
                     (prior.detach().float() if prior is not None else torch.zeros((), device=loss.device)).reshape(1),
                     lip.float().reshape(1).to(loss.device), norms_t.to(loss.device)]
            packed = torch.cat(parts)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=packed.is_cuda)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event() if packed.is_cuda else None
        if event is not None:
            event.record()
        lam, has_prior = self.config.lam, prior is not None

        def fill(m: StepMetrics) -> None:
            if event is not None:
                event.synchronize()
            v = host.double()
            m.loss = float(v[0]) + lam * float(host[3])
            m.denoise, m.lip = float(host[0 + 1]), float(host[3])
            m.prior = float(host[2]) if has_prior else None
            n = host[4:]
            m.delta_norm = float(n.double().norm())
            m.block_norms = self.delta.block_norms(list(n))

        nan = float("nan")
        return StepMetrics(step=self.step_count, total=self.config.steps, loss=nan, denoise=nan, prior=None,
                           lip=nan, delta_norm=nan, seconds=time.perf_counter() - start, _pending=fill)

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
        # The optimizer keeps the tensors it is given and updates them in place: copy, so the
        # same saved state can be loaded twice (or shared with another process) unharmed.
        state = copy.deepcopy(state)
        self.delta.load_state_dict(state["delta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
