"""How a step's gradients become an update of the delta: the paper's Adam, and its lean variant.

Both updates give Adam the gradient of the paper's summed loss, skip a step whose gradient is
not finite before it reaches the delta, and step one optimizer (lr, no schedule, no clipping).
``lambda * dL_lip/d(delta)`` comes in closed form (:mod:`trainer.objective`): for the L2 kinds
it is ``c_i * delta_i``, which is exactly Adam's coupled ``weight_decay`` with a per-tensor
coefficient, so the tensors are grouped by coefficient into parameter groups and Adam applies
it inside its own kernel (no pass of ours over the deltas); for ``l1`` it is added to the
gradients before the step.

* :class:`AdamUpdate` - the paper's: after backward, on all tensors at once.
* :class:`StepInBackwardUpdate` (``step_in_backward``) - the same optimizer, stepped during
  backward on each bucket of about :data:`BUCKET` values once its gradients are complete, which
  are then freed: the full set of gradients never exists at once (one parameter-sized buffer less
  at the peak), and the update is exactly the all-at-once one (Adam has no cross-tensor
  coupling).

A step's finiteness verdict is a 0-d device flag (:attr:`AdamUpdate.bad`).  Torch's fused Adam
takes it as ``found_inf`` and skips the update on the device, so it costs no host sync of its
own: the loop reads the flag with the step's metrics, in the step's one synchronisation.
:class:`~trainer.compact_adam.CompactAdam` takes it too but reads it on the host (one sync per
bucket), and the other torch kernels (``default``, ``foreach``) cannot skip, so for them the
flag is read before each step.

The Adam kernel (``config.adam``) is ``default`` (what torch picks: the faithful baseline),
``foreach`` or ``fused`` (the same update to 1e-6).
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from torch import Tensor

from .compact_adam import CompactAdam
from .config import ADAM_IMPLS, AdamImpl, ConfigError, TrainConfig
from .delta import ParameterDelta, buckets
from .objective import NonFiniteLossError, Regularizer

BUCKET = 1 << 24
"""Gradient values a ``step_in_backward`` update steps at once (64 MB in fp32): the buckets are
runs of consecutive tensors of at least this many values (:func:`trainer.delta.buckets`)."""


def make_adam(params: Sequence[Tensor] | Sequence[dict[str, Any]], lr: float,
              impl: AdamImpl = "default", config: TrainConfig | None = None,
              runs: Sequence[Sequence[Tensor]] | None = None) -> torch.optim.Optimizer:
    """``Adam(params, lr)`` with the requested kernel; ``params`` may be parameter groups
    (each with its ``weight_decay``), otherwise there is no weight decay.  A ``config`` with
    compact state (compact moments or a bf16 delta) gets :class:`CompactAdam`, which updates
    the delta's flat buffer in ``runs``, the buckets :class:`StepInBackwardUpdate` hands it."""
    params = list(params)
    if config is not None and config.compact_state:
        return CompactAdam(params, lr=lr, moments=config.moments, seed=config.seed, runs=runs)
    if impl not in ADAM_IMPLS:
        raise ConfigError("adam", f"unknown Adam implementation {impl!r}", f"Use one of {', '.join(ADAM_IMPLS)}")
    kernel = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(impl, {})
    return torch.optim.Adam(params, lr=lr, weight_decay=0.0, **kernel)


def make_update(delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> "AdamUpdate":
    cls = StepInBackwardUpdate if config.step_in_backward else AdamUpdate
    return cls(delta, regularizer, config)


class AdamUpdate:
    """The paper's update: the gradient of ``L_denoise + lambda L_lip``, a finiteness flag,
    one Adam step over all tensors.

    :meth:`state_dict` uses one layout whatever the parameter groups: Adam's per-tensor state
    keyed by the tensor's position in ``delta.tensors()`` and one group, as a single
    ``torch.optim.Adam`` over those tensors writes it, so resume files are interchangeable
    between the updates and the memory modes.
    """

    def __init__(self, delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> None:
        self.delta, self.regularizer, self.lam = delta, regularizer, config.lam
        self.decay = regularizer.weight_decay(delta, config.lam)
        tensors = delta.tensors()
        positions = {id(t): i for i, t in enumerate(tensors)}
        self.buckets = buckets(tensors, BUCKET)
        """The runs of the flat buffer the update steps at once (one partition, shared with a
        :class:`CompactAdam`)."""
        params: list[Tensor] | list[dict[str, Any]] = tensors
        if self.decay is not None:
            groups: dict[float, list[Tensor]] = {}
            for t, c in zip(tensors, self.decay):
                groups.setdefault(c, []).append(t)
            params = [{"params": ts, "weight_decay": c} for c, ts in groups.items()]
        self.optimizer = make_adam(params, config.lr, config.adam, config, runs=self.buckets)
        self._order = [positions[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        self._skips = isinstance(self.optimizer, CompactAdam) or config.adam == "fused"
        self.bad: Tensor | None = None
        """This step's verdict so far: a 0-d float flag on the device, 1 where a gradient was
        not finite (the update of the tensors it covers was skipped)."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.bad = None

    def begin(self, loss: Tensor) -> None:
        """Start the step's flag from the loss: a non-finite loss skips the update even where
        its gradient came out finite."""
        self.bad = torch.isfinite(loss.detach()).logical_not().float()

    def step(self, step_no: int) -> Tensor:
        """Apply the update (skipped on the device where the gradient is not finite) and
        return the step's flag; the loop raises :class:`NonFiniteLossError` when it is set."""
        self.delta.grads()
        self._step_tensors(self.delta.tensors())
        return self.bad

    def non_finite(self, step_no: int | None = None) -> NonFiniteLossError:
        """The error for a step whose flag is set."""
        return NonFiniteLossError(f"gradient became non-finite{_at(step_no)}: lower the learning rate")

    def _step_tensors(self, params: list[Tensor]) -> None:
        """Flag, regularize and step ``params`` (the others have no gradient, so the optimizer
        passes them by)."""
        grads = [p.grad for p in params]
        if self.decay is None:
            self.regularizer.add_tensor_grads_(params, grads, self.lam)
        bad = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).logical_not().float()
        self.bad = bad if self.bad is None else torch.maximum(self.bad, bad)
        if self._skips:
            self.optimizer.found_inf = self.bad
        elif bool(self.bad):
            raise self.non_finite()
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """The moments on the CPU, decoded one tensor at a time (at most one tensor's copy on
        the device at once), keyed by the tensor's position in the delta."""
        own = self.optimizer.state_dict()
        group = {k: v for k, v in own["param_groups"][0].items() if k not in ("params", "weight_decay")}
        state = {}
        for i, s in own["state"].items():
            state[self._order[i]] = {k: v.to("cpu") for k, v in s.items()}
        return {"state": state,
                "param_groups": [{**group, "weight_decay": 0.0, "params": list(range(len(self._order)))}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.optimizer.state_dict()  # this run's groups and hyperparameters, the saved moments
        where = {tensor_index: i for i, tensor_index in enumerate(self._order)}
        own["state"] = {where[int(i)]: s for i, s in state["state"].items()}
        self.optimizer.load_state_dict(own)


class StepInBackwardUpdate(AdamUpdate):
    """:class:`AdamUpdate`'s optimizer, stepped from the delta tensors' post-accumulate-grad
    hooks a bucket at a time.

    The buckets are fixed runs of about :data:`BUCKET` values of the delta's flat buffer
    (:func:`trainer.delta.buckets`), laid out in the order backward completes gradients, so a
    bucket is usually complete soon after its first gradient; a tensor's gradient is complete
    when its hook runs, and once all of a bucket's are, the bucket steps and its gradients are
    freed.  :meth:`step` gives the tensors the forward did not reach a zero denoising gradient,
    as the all-at-once update does, and steps the buckets left.  A non-finite gradient skips
    its bucket and every later one; the buckets stepped before it cannot be taken back (the
    error says so).
    """

    def __init__(self, delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> None:
        super().__init__(delta, regularizer, config)
        self._bucket_of = {id(p): i for i, run in enumerate(self.buckets) for p in run}
        self._waiting = [len(run) for run in self.buckets]
        self._arrived: list[list[Tensor]] = [[] for _ in self.buckets]
        # The hooks live on the delta tensors and must not keep this object alive: a tensor's
        # hooks are invisible to Python's cycle collector, so a bound method here would leak
        # the whole optimizer state (a full-size run's 7 GB of moments) after every run.
        ref = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(lambda t, ref=ref: ref()._hook(t))
                         for p in delta.tensors()]

    def _hook(self, p: Tensor) -> None:
        i = self._bucket_of[id(p)]
        self._waiting[i] -= 1
        self._arrived[i].append(p)
        if self._waiting[i] == 0:
            self._flush(i)

    def _flush(self, i: int) -> None:
        """Step bucket ``i`` alone: the gradients other buckets already hold are set aside while
        the optimizer (which steps every tensor that has a gradient) runs, then put back."""
        early = [(p, p.grad) for j, arrived in enumerate(self._arrived) if j != i for p in arrived]
        for p, _ in early:
            p.grad = None
        self._step_tensors(self.buckets[i])
        for p in self.buckets[i]:
            p.grad = None
        for p, grad in early:
            p.grad = grad
        self._arrived[i] = []

    def zero_grad(self) -> None:
        super().zero_grad()
        self._waiting = [len(run) for run in self.buckets]
        self._arrived = [[] for _ in self.buckets]

    def step(self, step_no: int) -> Tensor:
        for i, run in enumerate(self.buckets):
            if self._waiting[i] > 0:
                for p in run:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                        self._arrived[i].append(p)
                self._waiting[i] = 0
                self._flush(i)
        return self.bad

    def non_finite(self, step_no: int | None = None) -> NonFiniteLossError:
        return NonFiniteLossError(f"gradient became non-finite{_at(step_no)}: lower the learning rate "
                                  "(step_in_backward: the buckets stepped before it were already updated)")


def _at(step_no: int | None) -> str:
    return "" if step_no is None else f" at step {step_no}"
