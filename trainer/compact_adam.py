"""Adam with compact state over one flat buffer: the memory modes' optimizer (``12gb``, ``8gb``;
:mod:`trainer.memory`).

The parameters are the views :class:`~trainer.delta.ParameterDelta` makes of its one flat
buffer, and the moments are flat buffers of the same layout, so the update runs over large
contiguous ranges with a fixed number of ops per range instead of a Python loop per tensor:
each bucket of tensors (:func:`trainer.delta.buckets`, the ranges a ``step_in_backward``
update steps as their gradients complete) is gathered into one scratch buffer with a single
multi-tensor copy, then updated :data:`CHUNK` values at a time.  Chunking bounds the fp32
temporaries (at most six fp32 copies of one chunk, 64 MB each) and the chunk count sets the op
count of a step.  What stays resident between steps is stored by :class:`Codec`:

* ``moments="bf16"``: ``exp_avg`` and ``exp_avg_sq`` in bfloat16 (half of fp32);
* ``moments="fp8"``: both in float8 e4m3 with one fp32 scale per block of :data:`BLOCK` values
  (about a quarter of fp32); ``exp_avg_sq`` is stored as its square root, which halves the
  dynamic range a block must hold;
* a bf16 parameter (the ``8gb`` mode's delta) is written back from the fp32 result.

Every write to a compact format uses **stochastic rounding** (unbiased: ``E[round(x)] = x``).
Round-to-nearest would lose Adam's small per-step changes outright: ``0.999 * v`` rounds back
to ``v`` in bf16, and a 2e-6 step rounds away on a bf16 delta of 1e-3.  The random bits come
from a generator re-seeded from ``(seed, step, chunk)`` for every chunk, so a run (and a
resumed one) is reproducible.

With ``moments="fp32"`` and an fp32 parameter the arithmetic is torch's single-tensor Adam,
operation for operation (``tests/test_memory_modes.py`` checks it bitwise), so any difference
a compact mode makes comes from its storage alone.  In the fp8 format a value can underflow
to zero where its neighbour is 448x larger; a zero ``sqrt(v)`` under a surviving ``m`` would
make ``m / (sqrt(v) + eps)`` explode, so in that format the ratio is clipped to
:data:`RATIO_LIMIT`, which exact Adam with the default betas never reaches (its bound is about
7.3 for beta1 = 0.9, beta2 = 0.999).

:meth:`CompactAdam.state_dict` gives the moments decoded to fp32 in torch Adam's layout, one
tensor at a time, so resume files are the same whatever the mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor

from .delta import ALIGN, span

Moments = Literal["fp32", "bf16", "fp8"]
MOMENTS: tuple[str, ...] = ("fp32", "bf16", "fp8")
BLOCK = 256
CHUNK = 1 << 24
"""Values per slice of the update on a GPU (a multiple of :data:`ALIGN`): each op is one kernel
launch there, so fewer, larger slices are faster, up to what the temporaries may take."""
CPU_CHUNK = 1 << 20
"""Values per slice on the CPU, where an op has no launch cost but a slice that fits the caches
(4 MB of fp32) runs faster: about 20% on the 25.8M-parameter test U-Net, 2 cores."""
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
RATIO_LIMIT = 8.0
assert ALIGN % BLOCK == 0 and CHUNK % ALIGN == 0 and CPU_CHUNK % ALIGN == 0


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """``x`` (fp32) rounded to ``dtype`` (bf16 or fp8 e4m3) at random, up or down in
    proportion to the distance, so the rounding error is zero in expectation.

    Adds uniform random bits below the target's last mantissa bit to the fp32 bit pattern and
    truncates them.  For fp8 the caller scales ``x`` into [-448, 448]; values below e4m3's
    normal range (2^-6) are rounded to nearest instead.
    """
    drop = {torch.bfloat16: 16, FP8: 20}[dtype]
    bits = (x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()).view(torch.int32)
    noise = torch.randint(0, 1 << drop, bits.shape, device=bits.device, dtype=torch.int32, generator=generator)
    rounded = noise.add_(bits).bitwise_and_(~((1 << drop) - 1)).view(torch.float32)
    if dtype == FP8:
        rounded = rounded.clamp_(-FP8_MAX, FP8_MAX)
    return rounded.to(dtype)


class Codec:
    """How a flat fp32 vector is stored: ``fp32``, ``bf16``, or ``fp8`` (e4m3, one fp32 scale
    per :data:`BLOCK` values, scaled so each block's largest magnitude is 448).

    A stored vector is a dict of tensors (``value``; for fp8 ``value`` is ``[blocks, BLOCK]`` and
    ``scale`` ``[blocks, 1]``); a slice of it from block to block is a stored vector too
    (:meth:`part`).  Writes round
    stochastically with a generator (Adam's moments between steps) or to nearest without one
    (a resume file, read back once).  ``root``: the vector is stored as its square root and
    squared on the way out (``exp_avg_sq``).  The one 8-bit format of the pack: the memory
    modes' moments and :mod:`trainer.persist`'s compact resume files.
    """

    def __init__(self, moments: str) -> None:
        if moments not in MOMENTS:
            raise ValueError(f"unknown moment format {moments!r}; use one of {', '.join(MOMENTS)}")
        self.moments = moments

    def zeros(self, n: int, device: torch.device | str) -> dict[str, Tensor]:
        """A stored vector of ``n`` zeros (fp8: ``n`` rounded up to whole blocks)."""
        if self.moments != "fp8":
            dtype = torch.float32 if self.moments == "fp32" else torch.bfloat16
            return {"value": torch.zeros(n, dtype=dtype, device=device)}
        blocks = -(-n // BLOCK)
        return {"value": torch.zeros(blocks, BLOCK, dtype=FP8, device=device),
                "scale": torch.zeros(blocks, 1, dtype=torch.float32, device=device)}

    def part(self, stored: dict[str, Tensor], start: int, end: int) -> dict[str, Tensor]:
        """Values ``[start, end)`` of ``stored`` as a stored vector of views (fp8: ``start`` on a
        block boundary; ``end`` is rounded up to one)."""
        if self.moments != "fp8":
            return {"value": stored["value"][start:end]}
        first, last = start // BLOCK, -(-end // BLOCK)
        return {"value": stored["value"][first:last], "scale": stored["scale"][first:last]}

    def decode(self, stored: dict[str, Tensor], root: bool = False, nonzero: bool = False) -> Tensor:
        """The fp32 values (for ``fp32`` the stored tensor itself, to be updated in place);
        ``nonzero`` (fp8): a stored 0 comes back as half the smallest step of its block."""
        value = stored["value"]
        if self.moments == "fp32":
            return value
        if self.moments == "bf16":
            return value.float()
        x = value.float()
        if nonzero:
            x = torch.where(x > 0, x, 2.0**-10)  # e4m3's smallest positive value is 2^-9
        x = x.mul_(stored["scale"]).view(-1)
        return x.square_() if root else x

    def encode(self, stored: dict[str, Tensor], x: Tensor, root: bool = False,
               generator: torch.Generator | None = None) -> None:
        """Store fp32 ``x`` (as many values as ``stored`` holds; consumed: it may be scaled in place)."""
        value = stored["value"]
        if self.moments == "fp32":
            if x.data_ptr() != value.data_ptr():  # after decode the update happened in place
                value.copy_(x)
            return
        if self.moments == "bf16":
            value.copy_(x.to(torch.bfloat16) if generator is None else stochastic_round(x, torch.bfloat16, generator))
            return
        blocks = (x.sqrt_() if root else x).view(value.shape)
        # The smallest normal fp32 for an all-zero block: its values stay 0 and decode to 0.
        scale = torch.linalg.vector_norm(blocks, math.inf, dim=1, keepdim=True).div_(FP8_MAX).clamp_min_(2.0**-126)
        value.copy_(blocks.div_(scale).to(FP8) if generator is None else stochastic_round(blocks.div_(scale), FP8, generator))
        stored["scale"].copy_(scale)


@dataclass
class _Chunk:
    """One slice of the update: views of the gathered gradients, the parameter and both
    moments, its position (which seeds its rounding noise) and its per-value weight decay."""

    index: int
    grad: Tensor
    param: Tensor
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    decay: tuple[Tensor, Tensor] | None
    """``(coefficient per tensor, values per tensor)`` for ``repeat_interleave``; ``None``: no decay."""


@dataclass
class _Bucket:
    params: list[Tensor]
    into: list[Tensor]
    """Each parameter's place in the scratch buffer (views shaped like it)."""
    gathered: Tensor
    chunks: list[_Chunk]
    step: int = 0


class CompactAdam(torch.optim.Optimizer):
    """``torch.optim.Adam`` (coupled ``weight_decay``, no amsgrad) with compact moments and
    support for bf16 parameters, both written with stochastic rounding.

    The parameters must be the views of one :class:`~trainer.delta.ParameterDelta`'s flat
    buffer; ``runs`` are the ranges it updates at once (:func:`trainer.delta.buckets`, the
    ones a ``step_in_backward`` update hands it), all parameters in one range by default.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, moments: Moments = "bf16",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0, runs: Sequence[Sequence[Tensor]] | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.codec = Codec(moments)
        self.seed = seed
        self._group = {id(p): g for g in self.param_groups for p in g["params"]}  # lr, betas, eps: one for all
        own = [p for g in self.param_groups for p in g["params"]]
        flat = own[0]._base
        if flat is None or any(p._base is not flat or not p.is_contiguous() or p.storage_offset() % ALIGN for p in own):
            raise ValueError("CompactAdam updates the views of one ParameterDelta's flat buffer")
        self.flat = flat
        self.stores = {key: self.codec.zeros(flat.numel(), flat.device) for key in ("exp_avg", "exp_avg_sq")}
        for p in own:
            self.state[p] = {key: self.codec.part(store, *span(p)) for key, store in self.stores.items()}
        runs = [sorted(own, key=Tensor.storage_offset)] if runs is None else [list(r) for r in runs]
        if sorted(map(id, own)) != sorted(id(p) for r in runs for p in r):
            raise ValueError("the runs must hold each parameter once")
        self._scratch = torch.zeros(max(span(r[-1])[1] - span(r[0])[0] for r in runs), dtype=flat.dtype,
                                    device=flat.device)
        self._buckets = [self._bucket(r) for r in runs]
        self._of = {id(p): b for b in self._buckets for p in b.params}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _bucket(self, params: list[Tensor]) -> _Bucket:
        """A bucket's views, made once: each parameter's place in the scratch buffer (shared by
        all buckets), and its chunks of the scratch, the flat buffer and the moments."""
        base = span(params[0])[0]
        size = span(params[-1])[1] - base
        gathered = self._scratch[:size]
        spans = [(lo - base, hi - base, p) for p in params for lo, hi in [span(p)]]
        into = [gathered[lo:][:p.numel()].view(p.shape) for lo, _, p in spans]
        step = CPU_CHUNK if self.flat.device.type == "cpu" else CHUNK
        chunks = [_Chunk(index=(base + lo) // BLOCK, grad=gathered[lo:hi], param=self.flat[base + lo:base + hi],
                         exp_avg=self.codec.part(self.stores["exp_avg"], base + lo, base + hi),
                         exp_avg_sq=self.codec.part(self.stores["exp_avg_sq"], base + lo, base + hi),
                         decay=self._decay(spans, lo, hi))
                  for lo, hi in ((lo, min(lo + step, size)) for lo in range(0, size, step))]
        return _Bucket(params=params, into=into, gathered=gathered, chunks=chunks)

    def _decay(self, spans: list[tuple[int, int, Tensor]], start: int, end: int) -> tuple[Tensor, Tensor] | None:
        """Each value's weight decay in ``[start, end)`` as run lengths (padding included)."""
        coefs, counts = [], []
        for lo, hi, p in spans:
            lo, hi = max(lo, start), min(hi, end)
            if lo < hi:
                coefs.append(float(self._group[id(p)]["weight_decay"]))
                counts.append(hi - lo)
        if not any(coefs):
            return None
        device = self.flat.device
        return torch.tensor(coefs, dtype=torch.float32, device=device), torch.tensor(counts, device=device)

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + step * 7_919 + index) % (2**63))
        return g

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 - torch's signature
        """Update every bucket whose gradients are present (all of a bucket's, or none)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        for bucket in self._buckets:
            have = [p.grad is not None for p in bucket.params]
            if not any(have):
                continue
            if not all(have):
                raise RuntimeError("CompactAdam steps whole buckets: some gradients of a bucket are missing")
            self._update(bucket)

    def _update(self, bucket: _Bucket) -> None:
        bucket.gathered.zero_()  # the padding between tensors takes no update
        torch._foreach_copy_(bucket.into, [p.grad for p in bucket.params])
        bucket.step += 1
        group = self.param_groups[0]
        for chunk in bucket.chunks:
            self._update_chunk(chunk, bucket.step, group)

    def _update_chunk(self, chunk: _Chunk, step: int, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        gen = self._generator(chunk.param.device, step, chunk.index)
        p = chunk.param
        x = p if p.dtype == torch.float32 else p.float()
        grad = chunk.grad if chunk.grad.dtype == torch.float32 else chunk.grad.float()
        if chunk.decay is not None:
            coef, counts = chunk.decay
            grad.addcmul_(x, coef.repeat_interleave(counts, output_size=x.numel()))
        exp_avg = self.codec.decode(chunk.exp_avg)
        exp_avg_sq = self.codec.decode(chunk.exp_avg_sq, root=True)
        # torch.optim.adam._single_tensor_adam's arithmetic, in the same order.
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        step_size = lr / bias_correction1
        if self.codec.moments == "fp8":
            x.add_(torch.div(exp_avg, denom, out=denom).clamp_(-RATIO_LIMIT, RATIO_LIMIT), alpha=-step_size)
        else:
            x.addcdiv_(exp_avg, denom, value=-step_size)
        del denom
        if x is not p:
            p.copy_(stochastic_round(x, p.dtype, gen))
        del x, grad
        self.codec.encode(chunk.exp_avg, exp_avg, generator=gen)
        self.codec.encode(chunk.exp_avg_sq, exp_avg_sq, root=True, generator=gen)

    # -- resume: torch Adam's layout, moments decoded to fp32 --------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch Adam's layout on the CPU: each moment is decoded on the device and copied to
        the CPU before the next, so saving a stopped run needs one tensor's fp32 copy on the
        device, not all of them (6.9 GB for SD1.5)."""
        own = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for i, p in enumerate(params):
            step = self._of[id(p)].step
            if step == 0:
                continue
            entry = {"step": torch.tensor(float(step))}
            for key, root in (("exp_avg", False), ("exp_avg_sq", True)):
                entry[key] = self.codec.decode(self.state[p][key], root=root)[:p.numel()].to(
                    "cpu", copy=True).view(p.shape)
            state[i] = entry
        own["state"] = state
        return own

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            step = int(torch.as_tensor(s["step"]).item())
            self._of[id(p)].step = step
            gen = self._generator(p.device, step, int(i))
            for key, root in (("exp_avg", False), ("exp_avg_sq", True)):
                stored = self.state[p][key]
                x = torch.zeros(stored["value"].numel(), dtype=torch.float32, device=p.device)
                x[:p.numel()] = s[key].to(p.device, torch.float32).reshape(-1)
                self.codec.encode(stored, x, root=root, generator=gen)
