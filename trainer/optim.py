"""How a step's gradients become an update of the delta: the paper's Adam, and its lean variant.

Both updates add ``lambda * dL_lip/d(delta)`` in closed form (:mod:`trainer.objective`) to the
denoising gradient, refuse a non-finite gradient before it reaches the delta, and step
``torch.optim.Adam`` (lr, no weight decay, no schedule, no clipping):

* :class:`AdamUpdate` - the paper's: after backward, on all tensors at once.
* :class:`StepInBackwardUpdate` (``step_in_backward``) - each tensor's Adam steps as soon as its
  gradient is complete and the gradient is freed, so the full set of gradients never exists at
  once: one parameter-sized buffer less at the peak, exactly the per-tensor update of the
  paper's (Adam has no cross-tensor coupling).

The Adam kernel (``config.adam``) is ``default`` (what torch picks: the faithful baseline),
``foreach``, ``fused`` (same update to 1e-6) or ``8bit`` (bitsandbytes' block-wise 8-bit
moments: a quarter of Adam's memory and *not* the same update).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .config import ADAM_IMPLS, AdamImpl, ConfigError, TrainConfig
from .delta import ParameterDelta
from .lowrank import LowRankDelta
from .objective import NonFiniteLossError, Regularizer


def make_adam(params: Sequence[Tensor], lr: float, impl: AdamImpl = "default") -> torch.optim.Optimizer:
    """``Adam(params, lr, weight_decay=0)`` with the requested kernel."""
    params = list(params)
    if impl in ("default", "foreach", "fused"):
        kernel = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(impl, {})
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0, **kernel)
    if impl == "8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as exc:  # optional dependency
            raise ConfigError("adam", "8-bit Adam needs bitsandbytes, which is not installed",
                              "pip install bitsandbytes, or use adam=default") from exc
        return bnb.optim.Adam8bit(params, lr=lr, weight_decay=0.0)
    raise ConfigError("adam", f"unknown Adam implementation {impl!r}", f"Use one of {', '.join(ADAM_IMPLS)}")


def make_update(delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> "AdamUpdate":
    cls = StepInBackwardUpdate if config.step_in_backward else AdamUpdate
    return cls(delta, regularizer, config)


class AdamUpdate:
    """The paper's update: ``grad += lambda dL_lip``, finiteness check, one Adam step."""

    def __init__(self, delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> None:
        self.delta, self.regularizer, self.lam = delta, regularizer, config.lam
        self.optimizer = make_adam(delta.tensors(), config.lr, config.adam)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, step_no: int) -> None:
        """Apply the update; raise :class:`NonFiniteLossError` leaving the delta unchanged."""
        self.regularizer.add_grad_(self.delta, self.lam)
        grads = self.delta.grads()
        if not torch.isfinite(torch.stack(torch._foreach_norm(grads)).norm()):
            self.zero_grad()
            raise NonFiniteLossError(f"gradient became non-finite at step {step_no}: lower the learning rate")
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class StepInBackwardUpdate(AdamUpdate):
    """One Adam per delta tensor, stepped from the tensor's post-accumulate-grad hook.

    Tensors the forward did not reach get their step in :meth:`step`, with a zero denoising
    gradient, as the all-at-once update gives them.  ``state_dict`` has the layout of one
    ``torch.optim.Adam`` over the same tensors, so resume files are interchangeable.
    """

    def __init__(self, delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> None:
        if isinstance(delta, LowRankDelta):
            raise ConfigError("step_in_backward", "B and A of a low-rank weight share one regularizer term",
                              "Use step_in_backward with the full delta only")
        self.delta, self.regularizer, self.lam = delta, regularizer, config.lam
        self.params = delta.tensors()
        self.optimizers = [make_adam([p], config.lr, config.adam) for p in self.params]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._stepped: set[int] = set()
        self._bad: Tensor | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, p: Tensor) -> None:
        i = self._index[id(p)]
        self.regularizer.add_tensor_grads_([p], [p.grad], self.lam)
        bad = ~torch.isfinite(p.grad).all()
        self._bad = bad if self._bad is None else self._bad | bad
        self.optimizers[i].step()
        p.grad = None
        self._stepped.add(i)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self._stepped.clear()
        self._bad = None

    def step(self, step_no: int) -> None:
        for i, p in enumerate(self.params):
            if i not in self._stepped:
                p.grad = torch.zeros_like(p)
                self._hook(p)
        self._stepped.clear()
        if self._bad is not None and bool(self._bad):
            raise NonFiniteLossError(f"gradient became non-finite at step {step_no}: lower the learning rate "
                                     "(step_in_backward: tensors reached before it were already updated)")

    def state_dict(self) -> dict[str, Any]:
        state = {i: opt.state_dict()["state"][0] for i, opt in enumerate(self.optimizers)
                 if 0 in opt.state_dict()["state"]}
        group = {k: v for k, v in self.optimizers[0].state_dict()["param_groups"][0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict({"state": {0: state["state"][i]} if i in state["state"] else {},
                                 "param_groups": [{**group, "params": [0]}]})
