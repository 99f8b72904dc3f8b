"""Adam with compact state: the memory modes' optimizer (``12gb``, ``8gb``; :mod:`trainer.memory`).

Adam's update is computed in fp32 one tensor at a time (with ``step_in_backward`` each tensor as
its gradient completes) and within a tensor :data:`CHUNK` values at a time, so the fp32
temporaries are a few copies of one chunk (16 MB each), not of SD1.5's largest tensor (118 MB
each, about a dozen of them); what stays resident between steps is stored compactly:

* ``moments="bf16"``: ``exp_avg`` and ``exp_avg_sq`` in bfloat16 (half of fp32);
* ``moments="fp8"``: both in float8 e4m3 with one fp32 scale per block of :data:`BLOCK` values
  (about a quarter of fp32); ``exp_avg_sq`` is stored as its square root, which halves the
  dynamic range a block must hold;
* a bf16 parameter (the ``8gb`` mode's delta) is written back from the fp32 result.

Every write to a compact format uses **stochastic rounding** (unbiased: ``E[round(x)] = x``).
Round-to-nearest would lose Adam's small per-step changes outright: ``0.999 * v`` rounds back
to ``v`` in bf16, and a 2e-6 step rounds away on a bf16 delta of 1e-3.  The random bits come
from a generator re-seeded from ``(seed, step)`` at every step, so a run (and a resumed one) is
reproducible.

With ``moments="fp32"`` and an fp32 parameter the arithmetic is torch's single-tensor Adam,
operation for operation (``tests/test_memory_modes.py`` checks it bitwise), so any difference
a compact mode makes comes from its storage alone.  In the fp8 format a value can underflow
to zero where its neighbour is 448x larger; a zero ``sqrt(v)`` under a surviving ``m`` would
make ``m / (sqrt(v) + eps)`` explode, so in that format the ratio is clipped to
:data:`RATIO_LIMIT`, which exact Adam with the default betas never reaches (its bound is about
7.3 for beta1 = 0.9, beta2 = 0.999).

:meth:`CompactAdam.state_dict` gives the moments decoded to fp32 in torch Adam's layout, so
resume files are the same whatever the mode.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import torch
from torch import Tensor

Moments = Literal["fp32", "bf16", "fp8"]
MOMENTS: tuple[str, ...] = ("fp32", "bf16", "fp8")
BLOCK = 256
CHUNK = 1 << 22
"""Values per slice of the update (a multiple of :data:`BLOCK`)."""
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
RATIO_LIMIT = 8.0


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """``x`` (fp32) rounded to ``dtype`` (bf16 or fp8 e4m3) at random, up or down in
    proportion to the distance, so the rounding error is zero in expectation.

    Adds uniform random bits below the target's last mantissa bit to the fp32 bit pattern and
    truncates them.  For fp8 the caller scales ``x`` into [-448, 448]; values below e4m3's
    normal range (2^-6) are rounded to nearest instead.
    """
    drop = {torch.bfloat16: 16, FP8: 20}[dtype]
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << drop, bits.shape, device=bits.device, dtype=torch.int32, generator=generator)
    rounded = ((bits + noise) & ~((1 << drop) - 1)).view(torch.float32)
    if dtype == FP8:
        rounded = rounded.clamp_(-FP8_MAX, FP8_MAX)
    return rounded.to(dtype)


class _Codec:
    """How one moment is stored between steps, flat: ``decode`` gives values ``[start, end)`` in
    fp32, ``encode`` stores them."""

    def __init__(self, moments: str) -> None:
        if moments not in MOMENTS:
            raise ValueError(f"unknown moment format {moments!r}; use one of {', '.join(MOMENTS)}")
        self.moments = moments

    def zeros(self, like: Tensor) -> dict[str, Tensor]:
        if self.moments in ("fp32", "bf16"):
            dtype = torch.float32 if self.moments == "fp32" else torch.bfloat16
            return {"value": torch.zeros(like.numel(), dtype=dtype, device=like.device)}
        blocks = -(-like.numel() // BLOCK)
        return {"value": torch.zeros(blocks * BLOCK, dtype=FP8, device=like.device),
                "scale": torch.zeros(blocks, 1, dtype=torch.float32, device=like.device)}

    def decode(self, stored: dict[str, Tensor], start: int, end: int, root: bool) -> Tensor:
        """The fp32 values (for ``fp32`` the stored slice itself, updated in place)."""
        value = stored["value"]
        if self.moments == "fp32":
            return value[start:end]
        if self.moments == "bf16":
            return value[start:end].float()
        first, last = start // BLOCK, -(-end // BLOCK)
        x = (value[first * BLOCK: last * BLOCK].view(-1, BLOCK).float() * stored["scale"][first:last]).view(-1)
        x = x[: end - start]
        return x.square_() if root else x

    def encode(self, stored: dict[str, Tensor], start: int, end: int, x: Tensor, root: bool,
               generator: torch.Generator) -> None:
        value = stored["value"]
        if self.moments == "fp32":
            if x.data_ptr() != value[start:end].data_ptr():  # after decode the update happened in place
                value[start:end].copy_(x)
            return
        if self.moments == "bf16":
            value[start:end].copy_(stochastic_round(x, torch.bfloat16, generator))
            return
        first, last = start // BLOCK, -(-end // BLOCK)
        flat = x.sqrt() if root else x
        padded = torch.nn.functional.pad(flat, (0, (last - first) * BLOCK - flat.numel())).view(-1, BLOCK)
        scale = padded.abs().amax(dim=1, keepdim=True).div_(FP8_MAX)
        scaled = padded / torch.where(scale > 0, scale, torch.ones_like(scale))
        value[first * BLOCK: last * BLOCK].copy_(stochastic_round(scaled, FP8, generator).view(-1))
        stored["scale"][first:last].copy_(scale)


class CompactAdam(torch.optim.Optimizer):
    """``torch.optim.Adam`` (coupled ``weight_decay``, no amsgrad) with compact moments and
    support for bf16 parameters, both written with stochastic rounding."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, moments: Moments = "bf16",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0, positions: dict[int, int] | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.codec = _Codec(moments)
        self.seed = seed
        # Each tensor's rounding noise depends on (seed, step, its position in the delta), so
        # the same run gives the same values however the tensors are grouped or stepped.
        own = [p for g in self.param_groups for p in g["params"]]
        self.positions = positions or {id(p): i for i, p in enumerate(own)}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + step * 7_919 + index) % (2**63))
        return g

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 - torch's signature
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, self.positions[id(p)])

    def _update(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self.codec.zeros(p)
            state["exp_avg_sq"] = self.codec.zeros(p)
        state["step"] += 1
        step = int(state["step"].item())
        gen = self._generator(p.device, step, index)

        # Flat views of the parameter and gradient, sliced into chunks (a copy, written back,
        # for a layout that cannot be viewed flat).
        flat_p = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
        flat_g = p.grad.reshape(-1)
        for start in range(0, p.numel(), CHUNK):
            end = min(start + CHUNK, p.numel())
            self._update_chunk(flat_p[start:end], flat_g[start:end], state, start, end, step, group, gen)
        if flat_p.data_ptr() != p.data_ptr():
            p.copy_(flat_p.view(p.shape))

    def _update_chunk(self, p: Tensor, grad: Tensor, state: dict[str, Any], start: int, end: int, step: int,
                      group: dict[str, Any], gen: torch.Generator) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        x = p if p.dtype == torch.float32 else p.float()
        grad = grad if grad.dtype == torch.float32 else grad.float()
        if wd != 0:
            grad = grad.add(x, alpha=wd)
        exp_avg = self.codec.decode(state["exp_avg"], start, end, root=False)
        exp_avg_sq = self.codec.decode(state["exp_avg_sq"], start, end, root=True)
        # torch.optim.adam._single_tensor_adam's arithmetic, in the same order.
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        step_size = lr / bias_correction1
        if self.codec.moments == "fp8":
            x.add_((exp_avg / denom).clamp_(-RATIO_LIMIT, RATIO_LIMIT), alpha=-step_size)
        else:
            x.addcdiv_(exp_avg, denom, value=-step_size)
        if x is not p:
            p.copy_(stochastic_round(x, p.dtype, gen))
        self.codec.encode(state["exp_avg"], start, end, exp_avg, root=False, generator=gen)
        self.codec.encode(state["exp_avg_sq"], start, end, exp_avg_sq, root=True, generator=gen)

    # -- resume: torch Adam's layout, moments decoded to fp32 --------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch Adam's layout on the CPU: each moment is decoded on the device and copied to
        the CPU before the next, so saving a stopped run needs one tensor's fp32 copy on the
        device, not all of them (6.9 GB for SD1.5)."""
        own = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in own["state"].items():
            p = params[i]
            entry = {"step": s["step"].clone()}
            for key, root in (("exp_avg", False), ("exp_avg_sq", True)):
                entry[key] = self.codec.decode(s[key], 0, p.numel(), root=root).to("cpu", copy=True).view(p.shape)
            own["state"][i] = entry
        return own

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        moments = {int(i): s for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": {}})
        for i, s in moments.items():
            p = params[i]
            step = int(torch.as_tensor(s["step"]).item())
            gen = self._generator(p.device, step, self.positions[id(p)])
            entry = {"step": torch.tensor(float(step))}
            for key, root in (("exp_avg", False), ("exp_avg_sq", True)):
                stored = self.codec.zeros(p)
                self.codec.encode(stored, 0, p.numel(), s[key].to(p.device, torch.float32).reshape(-1), root=root,
                                  generator=gen)
                entry[key] = stored
            self.state[p] = entry
