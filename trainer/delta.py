"""The trainable delta: ``theta = theta0 + delta`` for every trained parameter tensor.

By default the anchor ``theta0`` is the module's own parameter tensors as the host holds them
(fp16 on a GPU), referenced and never written: no copy is made, the base model other holders
share is never mutated, and ``L_lip`` is a function of the deltas alone (fp32, or bf16 in the
``8gb`` memory mode).  Where the host holds the module in a narrower dtype than its checkpoint
file and the memory mode anchors to the file (``faithful``, ``lean``), the caller passes the
file's values as ``anchor`` instead, and the module's own tensors are only swapped back after
each layer.  :meth:`ParameterDelta.applied` makes the module compute with ``theta0 + delta`` lazily, one layer at a time, through forward hooks, so
no second full copy of the weights is built at once and gradient checkpointing recomputes the
sums instead of keeping them. Layers must be called through their ``forward`` (as ComfyUI's
and diffusers' layers are): torch's ``nn.MultiheadAttention`` reads a child's weight directly and
is refused.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


class ParameterDelta:
    """Deltas for the parameters of ``module`` selected by ``include`` (all by default): fp32
    (the paper) or ``dtype`` (bf16 for the ``8gb`` memory mode), against ``anchor`` (by name;
    the module's own tensors by default).

    Each delta is a leaf view of one flat buffer (:attr:`flat`; its place there: :func:`span`),
    so an optimizer can update runs of tensors as one range (:func:`buckets`)."""

    def __init__(
        self,
        module: nn.Module,
        include: Callable[[str], bool] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        anchor: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.module = module
        self.base = select_base(module, include)
        if anchor is not None:
            if set(anchor) != set(self.base) or any(anchor[n].shape != b.shape for n, b in self.base.items()):
                raise ValueError("the anchor's tensors must match the trained parameters' names and shapes")
            self.base = {name: anchor[name] for name in self.base}
        devices = {b.device for b in self.base.values()}
        if device is None and len(devices) > 1:
            raise ValueError(f"the trained parameters are on several devices ({sorted(map(str, devices))}): "
                             "load the model on one device")
        self.flat, offsets = _flat_storage(self.base, dtype, device or devices.pop())
        self.delta: dict[str, Tensor] = {
            name: self.flat[offsets[name]:offsets[name] + b.numel()].view(b.shape).requires_grad_(True)
            for name, b in self.base.items()
        }
        self._deferred: list[BaseException] | None = None

    # -- access ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.delta)

    def tensors(self) -> list[Tensor]:
        return list(self.delta.values())

    def grads(self) -> list[Tensor]:
        """The deltas' gradients, zeros for a tensor the forward did not reach.

        The paper's summed loss still gives such a tensor the regularizer's gradient, so the
        closed-form term needs a buffer to add into.
        """
        for d in self.delta.values():
            if d.grad is None:
                d.grad = torch.zeros_like(d)
        return [d.grad for d in self.delta.values()]

    def numel(self) -> int:
        return sum(d.numel() for d in self.delta.values())

    # -- persistence ----------------------------------------------------------------------
    @torch.no_grad()
    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """CPU copies of the deltas in ``dtype`` (fp32: exact), keyed by parameter name."""
        return {name: d.detach().to("cpu", dtype, copy=True) for name, d in self.delta.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = set(self.delta) - set(state)
        unexpected = set(state) - set(self.delta)
        if missing or unexpected:
            raise KeyError(f"delta keys differ: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for name, d in self.delta.items():
            if tuple(state[name].shape) != tuple(d.shape):
                raise ValueError(f"delta {name}: shape {tuple(state[name].shape)} != {tuple(d.shape)}")
            d.copy_(state[name])

    # -- injection ------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, checkpoint: Sequence[nn.Module] = ()) -> Iterator[None]:
        """Within the block, ``module`` computes with ``theta0 + delta``.

        Each owning sub-module swaps in its summed weights in a forward pre-hook and puts the
        base tensors back in a forward hook, so a sum lives only while its layer runs (and
        while autograd needs it).  Modules in ``checkpoint`` run under non-reentrant
        activation checkpointing; they must own no parameters directly (their children's
        hooks run again on recomputation).  Each owning sub-module's ``forward`` is wrapped to
        defer an exception raised while backward recomputes it (:meth:`deferring`).  A run
        enters this once (the hooks are registered once, not per step); everything is
        restored on exit, also after an exception.
        """
        modules = dict(self.module.named_modules())
        # detach once: a base that requires grad (torch's default for a Parameter) would
        # otherwise get its own full-size .grad, written onto the shared model.
        bases = {name: b.detach() for name, b in self.base.items()}
        # (attribute, the module's own tensor, put back after the layer; theta0; delta)
        slots: dict[nn.Module, list[tuple[str, Tensor, Tensor, Tensor]]] = defaultdict(list)
        for name in self.base:
            owner, _, attr = name.rpartition(".")
            slots[modules[owner]].append((attr, modules[owner]._parameters[attr], bases[name], self.delta[name]))

        operands = {m: [base for _, _, base, _ in entries] + [delta for _, _, _, delta in entries]
                    for m, entries in slots.items()}

        def swap_in(mod: nn.Module, _args: object) -> None:
            for (attr, _own, _base, _delta), total in zip(slots[mod], _LayerSum.apply(*operands[mod])):
                mod._parameters[attr] = total

        def swap_out(mod: nn.Module, _args: object, _out: object) -> None:
            for attr, own, _, _ in slots[mod]:
                mod._parameters[attr] = own

        for m in checkpoint:
            if any(True for _ in m.parameters(recurse=False)):
                raise ValueError(f"cannot checkpoint {type(m).__name__}: it owns parameters directly")
        handles = []
        try:
            for m in slots:
                handles.append(m.register_forward_pre_hook(swap_in))
                handles.append(m.register_forward_hook(swap_out))
                m.forward = self._deferrable(m.forward)
            for m in checkpoint:
                m.forward = _checkpointed(m.forward)
            yield
        finally:
            for h in handles:
                h.remove()
            for m in (*checkpoint, *slots):
                m.__dict__.pop("forward", None)
            for m, entries in slots.items():
                for attr, own, _, _ in entries:
                    m._parameters[attr] = own

    @contextlib.contextmanager
    def deferring(self, into: list[BaseException]) -> Iterator[None]:
        """Within the block, an exception a layer raises while backward recomputes it (under
        checkpointing) is appended to ``into`` and the layer is run again, so backward - and
        an update stepped inside it - completes; the caller raises it after the step.

        Why: a host checks for an interrupt at the entry of every layer (ComfyUI's
        ``run_every_op``, also during the recompute), and such a check fires once (ComfyUI
        clears its flag as it raises).  Were it let through, an update that steps tensors
        inside backward would leave half a step, which no resume can continue exactly; keeping
        a copy of the stepped state to undo it would cost the memory that update saves.  A
        layer that raises again on the second try is an error: it propagates.  The retry is
        exact because a layer here owns parameters and is one op (ComfyUI's Linear, Conv,
        norms): whatever it raises, it raised before autograd saved anything of it.
        """
        self._deferred = into
        try:
            yield
        finally:
            self._deferred = None

    def _deferrable(self, forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: object, **kwargs: object) -> Tensor:
            if self._deferred is None or torch._C._current_graph_task_id() == -1:  # not in backward
                return forward(*args, **kwargs)
            try:
                return forward(*args, **kwargs)
            except _CHECKPOINT_CONTROL:
                raise  # torch's checkpoint ends a recompute early this way: not the layer's error
            except Exception as exc:  # noqa: BLE001 - any host's exception type; re-raised by the caller
                self._deferred.append(exc)
                return forward(*args, **kwargs)

        return run


class _LayerSum(torch.autograd.Function):
    """``theta0 + delta`` for all of one layer's tensors (``*bases, *deltas``) in one multi-tensor
    add: one kernel launch for a layer's weight and bias where their dtypes match.

    Its backward hands each delta the sum's gradient (autograd casts it to a bf16 delta's dtype)
    and saves no tensor: the deltas are views of one flat buffer and so share one version
    counter, so a saved delta would fail backward once an update stepped during backward
    (``step_in_backward``) has written any other delta.
    """

    @staticmethod
    def forward(ctx: object, *tensors: Tensor) -> tuple[Tensor, ...]:
        half = len(tensors) // 2
        return tuple(torch._foreach_add(list(tensors[:half]), list(tensors[half:])))

    @staticmethod
    def backward(ctx: object, *grads: Tensor) -> tuple[Tensor | None, ...]:
        return (None,) * len(grads) + grads


# The exceptions torch's non-reentrant checkpoint raises through the recomputed forward itself
# (to stop a recompute once it has what backward needs, or on a mismatch).
_CHECKPOINT_CONTROL = tuple(getattr(torch.utils.checkpoint, name) for name in ("_StopRecomputationError", "CheckpointError")
                            if hasattr(torch.utils.checkpoint, name))


ALIGN = 256
"""Each tensor's delta starts at a multiple of this many values in :attr:`ParameterDelta.flat`,
so state kept in blocks of it (:mod:`trainer.compact_adam`'s fp8 moments) never straddles two
tensors."""


def _flat_storage(base: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device | str
                  ) -> tuple[Tensor, dict[str, int]]:
    """One zeroed buffer for all deltas and each tensor's offset in it.

    The tensors are laid out in reverse parameter order, the order in which backward completes
    their gradients (output layers first), so an update stepped during backward
    (:class:`trainer.optim.StepInBackwardUpdate`) finds each bucket of complete gradients in
    one contiguous range and can update it with a few large ops instead of one per tensor.
    """
    offsets, end = {}, 0
    for name in reversed(list(base)):
        offsets[name] = end
        end += _aligned(base[name].numel())
    return torch.zeros(end, dtype=dtype, device=device), offsets


def _aligned(n: int) -> int:
    """``n`` values rounded up to a whole number of :data:`ALIGN`: a tensor's range in the flat buffer."""
    return -(-n // ALIGN) * ALIGN


def span(t: Tensor) -> tuple[int, int]:
    """Where ``t`` (a view of :attr:`ParameterDelta.flat`) starts and where its aligned range
    ends, as offsets into the flat buffer: the range an update may write, padding included."""
    start = t.storage_offset() - t._base.storage_offset()
    return start, start + _aligned(t.numel())


def buckets(tensors: Sequence[Tensor], size: int) -> list[list[Tensor]]:
    """``tensors`` (views of one :attr:`ParameterDelta.flat`) in flat order, cut into runs of
    consecutive tensors of at least ``size`` values each (the last may hold fewer): the ranges
    an update takes at once."""
    runs: list[list[Tensor]] = [[]]
    count = 0
    for t in sorted(tensors, key=lambda t: t.storage_offset()):
        if count >= size:
            runs.append([])
            count = 0
        runs[-1].append(t)
        count += t.numel()
    return runs


def select_base(module: nn.Module, include: Callable[[str], bool] | None) -> dict[str, Tensor]:
    """The module's parameters to train (all by default): the anchor ``theta0``, by reference."""
    fused = [n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if fused:
        # It reads its out_proj's weight without calling out_proj, so the forward hooks that
        # add the delta would be bypassed silently.
        raise TypeError(f"nn.MultiheadAttention is not supported (at {fused[0]!r}): use Linear layers")
    base = {name: p for name, p in module.named_parameters() if include is None or include(name)}
    if not base:
        raise ValueError("no parameter selected for training")
    return base


def _checkpointed(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args: object, **kwargs: object) -> Tensor:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
