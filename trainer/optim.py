"""How a step's gradients become an update of the delta: the paper's Adam, and its lean variant.

Both updates give Adam the gradient of the paper's summed loss, refuse a non-finite gradient
before it reaches the delta, and step ``torch.optim.Adam`` (lr, no schedule, no clipping).
``lambda * dL_lip/d(delta)`` comes in closed form (:mod:`trainer.objective`): for the L2 kinds
on the full delta it is ``c_i * delta_i``, which is exactly Adam's coupled ``weight_decay`` with
a per-tensor coefficient, so the tensors are grouped by coefficient into parameter groups and
Adam applies it inside its own kernel (no pass of ours over the deltas); otherwise (``l1``, the
low-rank factors, 8-bit Adam) it is added to the gradients before the step.

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

import weakref
from typing import Any, Sequence

import torch
from torch import Tensor

from .compact_adam import CompactAdam
from .config import ADAM_IMPLS, AdamImpl, ConfigError, TrainConfig
from .delta import ParameterDelta
from .lowrank import LowRankDelta
from .objective import NonFiniteLossError, Regularizer


def make_adam(params: Sequence[Tensor] | Sequence[dict[str, Any]], lr: float,
              impl: AdamImpl = "default", config: TrainConfig | None = None,
              positions: dict[int, int] | None = None) -> torch.optim.Optimizer:
    """``Adam(params, lr)`` with the requested kernel; ``params`` may be parameter groups
    (each with its ``weight_decay``), otherwise there is no weight decay.  A ``config`` with
    compact state (compact moments or a bf16 delta) gets :class:`CompactAdam` (``positions``:
    each tensor's index in the delta, which seeds its rounding noise)."""
    params = list(params)
    if config is not None and config.compact_state:
        return CompactAdam(params, lr=lr, moments=config.moments, seed=config.seed, positions=positions)
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


def _weight_decay(delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> list[float] | None:
    """Per-tensor Adam weight decay that applies ``lambda * dL_lip``, or ``None`` (closed form)."""
    return None if config.adam == "8bit" else regularizer.weight_decay(delta, config.lam)


class AdamUpdate:
    """The paper's update: the gradient of ``L_denoise + lambda L_lip``, a finiteness check,
    one Adam step.

    :meth:`state_dict` uses one layout whatever the parameter groups: Adam's per-tensor state
    keyed by the tensor's position in ``delta.tensors()`` and one group, as a single
    ``torch.optim.Adam`` over those tensors writes it, so resume files are interchangeable
    between the updates.
    """

    def __init__(self, delta: ParameterDelta, regularizer: Regularizer, config: TrainConfig) -> None:
        self.delta, self.regularizer, self.lam = delta, regularizer, config.lam
        self.decay = _weight_decay(delta, regularizer, config)
        tensors = delta.tensors()
        positions = {id(t): i for i, t in enumerate(tensors)}
        if self.decay is None:
            self.optimizer = make_adam(tensors, config.lr, config.adam, config, positions)
        else:
            groups: dict[float, list[Tensor]] = {}
            for t, c in zip(tensors, self.decay):
                groups.setdefault(c, []).append(t)
            self.optimizer = make_adam([{"params": ts, "weight_decay": c} for c, ts in groups.items()],
                                       config.lr, config.adam, config, positions)
        position = {id(t): i for i, t in enumerate(tensors)}
        self._order = [position[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, step_no: int) -> None:
        """Apply the update; raise :class:`NonFiniteLossError` leaving the delta unchanged."""
        grads = self.delta.grads()
        if self.decay is None:
            self.regularizer.add_grad_(self.delta, self.lam)
        if not torch.isfinite(torch.stack(torch._foreach_norm(grads)).norm()):
            self.zero_grad()
            raise NonFiniteLossError(f"gradient became non-finite at step {step_no}: lower the learning rate")
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        own = self.optimizer.state_dict()
        group = {k: v for k, v in own["param_groups"][0].items() if k not in ("params", "weight_decay")}
        return {"state": {self._order[i]: s for i, s in own["state"].items()},
                "param_groups": [{**group, "weight_decay": 0.0, "params": list(range(len(self._order)))}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.optimizer.state_dict()  # this run's groups and hyperparameters, the saved moments
        where = {tensor_index: i for i, tensor_index in enumerate(self._order)}
        own["state"] = {where[int(i)]: s for i, s in state["state"].items()}
        self.optimizer.load_state_dict(own)


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
        self.decay = _weight_decay(delta, regularizer, config)
        self.optimizers = [make_adam([p] if self.decay is None else [{"params": [p], "weight_decay": c}],
                                     config.lr, config.adam, config, {id(p): i})
                           for i, (p, c) in enumerate(zip(self.params, self.decay or [0.0] * len(self.params)))]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._stepped: set[int] = set()
        self._bad: Tensor | None = None
        # The hooks live on the delta tensors and must not keep this object alive: a tensor's
        # hooks are invisible to Python's cycle collector, so a bound method here would leak
        # the whole optimizer state (a full-size run's 7 GB of moments) after every run.
        ref = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(lambda t, ref=ref: ref()._hook(t))
                         for p in self.params]

    def _hook(self, p: Tensor) -> None:
        i = self._index[id(p)]
        if self.decay is None:
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
        group = {k: v for k, v in self.optimizers[0].state_dict()["param_groups"][0].items()
                 if k not in ("params", "weight_decay")}
        return {"state": state,
                "param_groups": [{**group, "weight_decay": 0.0, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {int(i): s for i, s in state["state"].items()}
        for i, opt in enumerate(self.optimizers):
            own = opt.state_dict()
            own["state"] = {0: saved[i]} if i in saved else {}
            opt.load_state_dict(own)
