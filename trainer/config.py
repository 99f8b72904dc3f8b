"""The run's hyperparameters: the paper's reference SD1.5 run as defaults, checked in one place.

Every host reads its defaults from :class:`TrainConfig` (the ComfyUI node builds its widgets
from :data:`DEFAULTS`) and every host checks its inputs with :meth:`TrainConfig.validate`,
which raises :class:`ConfigError` naming the field, the problem and the fix; the node maps the
field to its input's name.  Options that depart from the paper are fields too, each off by
default and documented with what it changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch

RegularizerKind = Literal["mean_sq", "sum_sq", "l1"]
REGULARIZERS: tuple[str, ...] = ("mean_sq", "sum_sq", "l1")
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
AdamImpl = Literal["default", "foreach", "fused"]
ADAM_IMPLS: tuple[str, ...] = ("default", "foreach", "fused")
MomentFormat = Literal["fp32", "bf16", "fp8"]
MOMENT_FORMATS: tuple[str, ...] = ("fp32", "bf16", "fp8")
DeltaPrecision = Literal["fp32", "bf16"]
DELTA_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


class ConfigError(ValueError):
    """One bad hyperparameter: which field, what is wrong, how to fix it."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        super().__init__(f"{field}: {problem}. {fix}")
        self.field, self.problem, self.fix = field, problem, fix


@dataclass
class TrainConfig:
    """Hyperparameters; the defaults are the paper's reference SD1.5 run (``docs``: method)."""

    steps: int = 1000
    lr: float = 2e-6
    lam: float = 500.0
    """lambda of ``L_denoise + lambda * L_lip``: 0 is plain fine-tuning, larger preserves more."""
    regularizer: RegularizerKind = "mean_sq"
    """``mean_sq`` = the paper (per-tensor mean); ``sum_sq`` and ``l1`` are variants."""
    seed: int = 2025
    batch_size: int = 1
    resolution: int = 512
    """Training image side in pixels (the host resizes the photos; a multiple of 64)."""
    gradient_checkpointing: bool = True
    prior_weight: float = 1.0
    """Weight of the DreamBooth prior-preservation term, when class images are given."""
    # Options: each default is the paper's fp32 path (docs/performance.md measures each).
    precision: Precision = "fp32"
    """``bf16``: the forward and backward compute in bf16; deltas, gradients and Adam stay fp32."""
    tf32: bool = False
    """Let fp32 matmuls and convolutions on NVIDIA GPUs (Ampere and later) take TF32 inputs (10-bit
    mantissa, fp32 accumulation): faster.  Off (the paper) is strict fp32, whatever PyTorch's
    process-wide default; :func:`trainer.precision.tf32_as_configured` sets and restores the flags
    around the run.  No effect on a CPU."""
    adam: AdamImpl = "default"
    """Adam kernel (:mod:`trainer.optim`): each computes the paper's update."""
    step_in_backward: bool = False
    """Step each delta tensor's Adam as soon as its gradient is complete and free the gradient:
    one parameter-sized buffer less at the peak, the same update.  A non-finite gradient under
    a finite loss is detected after some tensors already stepped."""
    moments: MomentFormat = "fp32"
    """How Adam's moments are stored between steps (:mod:`trainer.compact_adam`): ``fp32`` (the
    paper), ``bf16`` (half) or ``fp8`` (8-bit, block-scaled; a quarter), written with stochastic
    rounding.  The update itself is computed in fp32."""
    delta_precision: DeltaPrecision = "fp32"
    """dtype of the trained delta: ``fp32`` (the paper) or ``bf16`` (half; each update is written
    with stochastic rounding, so steps far below a bf16 step of the delta still count on average)."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first field that is out of range."""
        checks = [
            ("steps", isinstance(self.steps, int) and self.steps >= 1,
             f"steps must be an integer >= 1, got {self.steps!r}", "Use 1000 (the paper) or fewer for a quick try"),
            ("lr", _finite(self.lr) and self.lr > 0, f"the learning rate must be a finite number > 0, got {self.lr!r}",
             "Use 2e-6 (the paper)"),
            ("lam", _finite(self.lam) and self.lam >= 0, f"lambda must be a finite number >= 0, got {self.lam!r}",
             "Use 500 (the paper), 0 for plain fine-tuning, larger to preserve more"),
            ("regularizer", self.regularizer in REGULARIZERS, f"unknown kind {self.regularizer!r}",
             f"Use one of {', '.join(REGULARIZERS)}"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch size must be at least 1, got {self.batch_size!r}", "Use 1 (the paper)"),
            ("resolution", isinstance(self.resolution, int) and self.resolution >= 64 and self.resolution % 64 == 0,
             f"resolution must be a multiple of 64, got {self.resolution!r}", "Use 512 for SD1.5"),
            ("prior_weight", _finite(self.prior_weight) and self.prior_weight >= 0,
             f"prior weight must be a finite number >= 0, got {self.prior_weight!r}", "Use 1.0 (DreamBooth)"),
            ("precision", self.precision in PRECISIONS, f"unknown precision {self.precision!r}",
             "Use fp32 (the paper) or bf16"),
            ("tf32", isinstance(self.tf32, bool), f"tf32 must be true or false, got {self.tf32!r}",
             "Use false (strict fp32, the paper) or true (TF32 matmuls on NVIDIA GPUs)"),
            ("adam", self.adam in ADAM_IMPLS, f"unknown Adam implementation {self.adam!r}",
             f"Use one of {', '.join(ADAM_IMPLS)}"),
            ("moments", self.moments in MOMENT_FORMATS, f"unknown moment format {self.moments!r}",
             f"Use one of {', '.join(MOMENT_FORMATS)}"),
            ("delta_precision", self.delta_precision in DELTA_PRECISIONS,
             f"unknown delta precision {self.delta_precision!r}", f"Use one of {', '.join(DELTA_PRECISIONS)}"),
            ("adam", self.adam == "default" or not self.compact_state,
             f"adam={self.adam} cannot store compact moments or update a bf16 delta",
             "Use adam=default with moments or delta_precision other than fp32"),
        ]
        for name, ok, problem, fix in checks:
            if not ok:
                raise ConfigError(name, problem, fix)


    @property
    def delta_torch_dtype(self) -> torch.dtype:
        """The trained delta's dtype: fp32 (the paper) or bf16 (``delta_precision="bf16"``)."""
        return torch.bfloat16 if self.delta_precision == "bf16" else torch.float32

    @property
    def compact_state(self) -> bool:
        """Whether the optimizer is :class:`trainer.compact_adam.CompactAdam` (compact moments or
        a bf16 delta) rather than torch's Adam."""
        return self.moments != "fp32" or self.delta_precision != "fp32"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


DEFAULTS = TrainConfig()
"""The paper's values, for hosts that build inputs from them."""

FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))
