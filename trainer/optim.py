"""Adam implementations for the deltas, and Adam stepped inside backward.

The paper's optimizer is ``torch.optim.Adam`` (no weight decay).  Adam is element-wise, so
every implementation below computes the same update up to floating-point rounding:

* ``default`` - whatever torch picks (for-loop on CPU, foreach on CUDA): the faithful baseline.
* ``foreach`` - one multi-tensor kernel per Adam operation: fewer launches on a GPU.
* ``fused`` - one fused kernel per tensor group; it can also skip a non-finite step on the
  device (``found_inf``), which is what lets the trainer avoid a host synchronisation.
* ``8bit`` - ``bitsandbytes.optim.Adam8bit`` (optional dependency): block-wise 8-bit moments,
  a quarter of Adam's state memory, and *not* the same update (quantised moments).

:class:`StepInBackward` applies Adam to each delta tensor as soon as its gradient is complete
(a post-accumulate-grad hook), adds the closed-form ``L_lip`` gradient first and frees the
gradient right away, so the full set of gradients never exists at once: one parameter-sized
buffer less at the peak, with exactly the per-tensor update of ``default`` (Adam has no
cross-tensor coupling).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

AdamImpl = Literal["default", "foreach", "fused", "8bit"]
ADAM_IMPLS: tuple[str, ...] = ("default", "foreach", "fused", "8bit")


def make_adam(params: Sequence[Tensor], lr: float, impl: AdamImpl = "default") -> torch.optim.Optimizer:
    """``Adam(params, lr, weight_decay=0)`` in the requested implementation."""
    params = list(params)
    if impl == "default":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    if impl == "foreach":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0, foreach=True)
    if impl == "fused":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0, fused=True)
    if impl == "8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as exc:  # optional dependency
            raise ValueError("adam='8bit' needs bitsandbytes: pip install bitsandbytes") from exc
        return bnb.optim.Adam8bit(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"adam must be one of {ADAM_IMPLS}, got {impl!r}")


class StepInBackward:
    """One Adam per delta tensor, stepped from the tensor's post-accumulate-grad hook.

    ``before_step(tensor, grad)`` runs first (the trainer adds ``lambda * dL_lip/d(delta)``
    there).  Tensors the forward did not reach get their step in :meth:`finish`, with a zero
    denoising gradient, as the all-at-once step gives them.  ``state_dict`` has the layout of
    a single ``torch.optim.Adam`` over the same tensors, so resume files are interchangeable.
    """

    def __init__(self, params: Sequence[Tensor], lr: float, impl: AdamImpl,
                 before_step: Callable[[Tensor, Tensor], None]) -> None:
        self.params = list(params)
        self.optimizers = [make_adam([p], lr, impl) for p in self.params]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._stepped: set[int] = set()
        self._before = before_step
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        # A template for the combined state_dict's param_groups.
        self.param_groups = [{**self.optimizers[0].param_groups[0], "params": self.params}]

    def _hook(self, p: Tensor) -> None:
        i = self._index[id(p)]
        self._before(p, p.grad)
        self.optimizers[i].step()
        p.grad = None
        self._stepped.add(i)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self._stepped.clear()

    def finish(self) -> None:
        """Step the tensors that received no gradient in this backward."""
        for i, p in enumerate(self.params):
            if i not in self._stepped:
                p.grad = torch.zeros_like(p)
                self._hook(p)
        self._stepped.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for i, opt in enumerate(self.optimizers):
            s = opt.state_dict()["state"]
            if 0 in s:
                state[i] = s[0]
        group = {k: v for k, v in self.optimizers[0].state_dict()["param_groups"][0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
        for i, opt in enumerate(self.optimizers):
            sub = {"state": {0: state["state"][i]} if i in state["state"] else {},
                   "param_groups": [{**group, "params": [0]}]}
            opt.load_state_dict(sub)
