"""Memory modes: the same training at four memory budgets, and the estimate that picks one.

A mode is a recipe of :class:`~trainer.config.TrainConfig` options for the delta and
optimizer state, plus where the anchor ``theta0`` comes from; :func:`configure` applies it.
The compute precision is a separate choice (``precision``).  From the most faithful to the
leanest:

* ``faithful`` - the paper: fp32 anchor (the checkpoint's values), fp32 delta, all gradients,
  then one Adam step (torch's fused kernel: the default update up to fp32 rounding order).
* ``lean`` - the same training without the full gradient buffer: each tensor's Adam steps in
  backward as its gradient completes (bitwise the ``faithful`` update on CPU).
* ``12gb`` - the anchor as the host stores the model (fp16 on GPUs) and Adam's moments in bf16
  with stochastic rounding; fp32 delta.
* ``8gb`` - as ``12gb`` with a bf16 delta (stochastic rounding) and 8-bit (fp8, block-scaled)
  moments.

Measured on an H100 (``docs/performance.md``): after 10 steps at 512 px the ``12gb`` delta has
cosine 0.99995 with ``faithful``'s and ``8gb`` 0.9988.  bf16 compute *combined with* a
half-precision anchor gave cosine 0.84 after 20 steps (each alone: 0.9995 and 0.99998), which
is why these modes keep fp32 compute by default.

:func:`estimate` counts the peak bytes of a mode from the parameter count, the resolution,
the batch size and checkpointing, so a host can refuse a run that cannot fit before it
allocates anything, and ``auto`` (:func:`choose`) picks the most faithful mode that fits.
The state terms are exact byte counts; the activation term is a per-pixel coefficient measured
on the full-size SD1.5 U-Net (``tools/bench_gpu.py``; ``docs/performance.md``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .compact_adam import BLOCK, CHUNK
from .config import ConfigError, TrainConfig
from .optim import BUCKET

AnchorSource = Literal["checkpoint", "model"]  # where theta0 comes from (the host's Anchor says how it is read)
GB = 1e9


@dataclass(frozen=True)
class MemoryMode:
    name: str
    anchor: AnchorSource
    """``checkpoint``: theta0 is the checkpoint file's values (fp32 for an fp32 file);
    ``model``: theta0 is the model as the host stores it (fp16 on a GPU)."""
    options: dict
    """The :class:`TrainConfig` fields the mode sets."""
    changes: str
    """What the mode changes from the paper's run, for tooltips and the README."""


MODES: dict[str, MemoryMode] = {m.name: m for m in (
    MemoryMode("faithful", "checkpoint",
               dict(adam="fused", step_in_backward=False, moments="fp32", delta_precision="fp32"),
               "nothing: the paper's fp32 run (torch's fused Adam kernel: the default update up to rounding order)"),
    MemoryMode("lean", "checkpoint",
               dict(adam="fused", step_in_backward=True, moments="fp32", delta_precision="fp32"),
               "nothing in the maths: Adam steps each bucket of tensors during backward as its gradients "
               "complete, so the full gradient buffer is never held"),
    MemoryMode("12gb", "model",
               dict(adam="default", step_in_backward=True, moments="bf16", delta_precision="fp32"),
               "the anchor in the model's storage dtype (fp16 on GPUs) and Adam's moments stored in bf16 "
               "(stochastic rounding); fp32 compute and delta"),
    MemoryMode("8gb", "model",
               dict(adam="default", step_in_backward=True, moments="fp8", delta_precision="bf16"),
               "as 12gb, with a bf16 delta (stochastic rounding) and 8-bit block-scaled Adam moments"),
)}
ORDER: tuple[str, ...] = tuple(MODES)
"""Most faithful first: ``auto`` takes the first that fits."""
CHOICES: tuple[str, ...] = ("auto", *ORDER)

# The transient above the state (anchor, delta, gradients, moments) in a step, SD1.5's U-Net,
# batch 1, gradient checkpointing: measured on an H100 with tools/bench_gpu.py under a capped
# allocator (docs/gpu/*.jsonl): lean 1.05 / 0.91 / 1.00 GB over the state at 256 / 384 / 512
# px, so nearly constant per model (the per-layer theta0 + delta sums, one checkpointed block's
# activations, the kernels' workspaces) with a small per-pixel part.  Without checkpointing
# the activations were not measured under a cap; ACTIVATION_NO_CHECKPOINTING is a guess from
# the stored block outputs (about 6x the checkpointed boundary tensors).
TRANSIENT_PER_PARAM = 1.0 * GB / 859.5e6
ACTIVATION_PER_PIXEL = {"fp32": 500.0, "bf16": 250.0}
ACTIVATION_NO_CHECKPOINTING = 6.0
OVERHEAD = 0.2 * GB
"""The host's buffers during training (latents, embeddings, RNG) and the allocator's slack."""


@dataclass(frozen=True)
class Estimate:
    """The peak of one mode, in bytes, term by term."""

    mode: str
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GB)


def configure(config: TrainConfig, mode: str) -> TrainConfig:
    """``config`` with the options of memory mode ``mode``."""
    if mode not in MODES:
        raise ConfigError("memory", f"unknown memory mode {mode!r}", f"Use one of {', '.join(CHOICES)}")
    return dataclasses.replace(config, **MODES[mode].options)


def estimate(mode: str, params: int, largest: int, anchor_bytes: int, resolution: int, batch_size: int = 1,
             checkpointing: bool = True, precision: str = "fp32") -> Estimate:
    """Peak bytes of training ``params`` parameters (``largest`` in the biggest tensor) in ``mode``.

    ``anchor_bytes``: bytes per parameter of theta0 in this mode (4 for an fp32 checkpoint
    anchor, 2 for an fp16 model, 0 where the host already holds it in that memory).  A host
    that reads theta0 from the file keeps its own copy of the weights out of that memory.
    """
    c = configure(TrainConfig(), mode)
    delta = c.delta_torch_dtype.itemsize
    moments = {"fp32": 8.0, "bf16": 4.0, "fp8": 2.0 + 8.0 / BLOCK}[c.moments]  # fp8: + one fp32 scale per block
    # Stepping in backward holds one bucket's gradients (a run of at least BUCKET values that
    # ends with a whole tensor): on SD1.5's U-Net never more at once (tests/test_memory_modes.py).
    bucket = min(params, BUCKET + largest)
    grads = bucket * delta if c.step_in_backward else params * delta
    # torch's default multi-tensor Adam holds one parameter-sized temporary; fused and the
    # per-tensor updates hold a few copies of one tensor, the compact update a bucket-sized
    # scratch buffer for the gathered gradients and up to six fp32 copies of one chunk (5.5 measured in 8gb).
    if c.compact_state:
        adam_temp = bucket * delta + min(params, CHUNK) * 4 * 6
    elif c.step_in_backward or c.adam == "fused":
        adam_temp = largest * 4 * 6
    else:
        adam_temp = params * 4
    act = ACTIVATION_PER_PIXEL[precision] * resolution * resolution * batch_size
    if not checkpointing:
        act *= ACTIVATION_NO_CHECKPOINTING
    parts = {"anchor": float(params * anchor_bytes), "delta": float(params * delta), "gradients": float(grads),
             "adam": params * moments + adam_temp, "activations": TRANSIENT_PER_PARAM * params + act,
             "other": OVERHEAD}
    return Estimate(mode, parts)


def preflight(requested: str, free_bytes: float, estimates: dict[str, Estimate], where: str = "this device"
              ) -> tuple[str, str]:
    """The pre-flight check: ``(mode, why)`` for ``requested`` (a mode or ``auto``), or
    :class:`ConfigError` on ``memory`` when its estimate exceeds ``free_bytes``, naming a leaner
    mode that fits if there is one."""
    if requested == "auto":
        mode, why = choose(free_bytes, estimates)
        if mode is not None:
            return mode, "auto: " + why
        mode = ORDER[-1]
    elif requested in MODES:
        mode = requested
        need = estimates[mode].total
        if need <= free_bytes:
            return mode, f"needs about {need / GB:.1f} GB, {free_bytes / GB:.1f} GB are free"
    else:
        raise ConfigError("memory", f"unknown memory mode {requested!r}", f"Use one of {', '.join(CHOICES)}")
    leaner = next((m for m in ORDER[ORDER.index(mode) + 1:] if estimates[m].total <= free_bytes), None)
    fix = (f"Choose memory={leaner}, a lower resolution or batch 1" if leaner else
           "Choose a lower resolution or batch 1, or free memory (close other programs on this device)")
    raise ConfigError("memory", f"{mode} needs about {estimates[mode].total / GB:.1f} GB on {where} "
                      f"({estimates[mode].describe()}), {free_bytes / GB:.1f} GB are free", fix)


def choose(free_bytes: float, estimates: dict[str, Estimate]) -> tuple[str | None, str]:
    """The most faithful mode whose estimate fits ``free_bytes``, and why (``None``: none fits)."""
    for name in ORDER:
        if name in estimates and estimates[name].total <= free_bytes:
            skipped = [f"{n} needs {estimates[n].total / GB:.1f} GB" for n in ORDER[: ORDER.index(name)]
                       if n in estimates]
            why = f"{name} needs about {estimates[name].total / GB:.1f} GB, {free_bytes / GB:.1f} GB are free"
            return name, why + (f" ({'; '.join(skipped)})" if skipped else "")
    return None, f"no mode fits in {free_bytes / GB:.1f} GB free"


def between_steps(plan: Estimate, free_bytes: float) -> float:
    """Bytes that work between two training steps (a preview) may take without passing the plan:
    the step's activations and transients, freed when it ends, plus what the plan left free."""
    return plan.parts["activations"] + max(free_bytes - plan.total, 0.0)
