"""One personalization on diffusers' SD1.5 with the pack's trainer, unchanged.

Mirrors ``nodes/host/run.py`` (``_trainer`` and ``_Training.run``) for the diffusers host: the
photos' latents and the instance prompt's embedding are computed once, the trainer gets the
U-Net's eps function, the scheduler's ``abar_t``, the checkpointed layers and a
:class:`trainer.delta.ParameterDelta` over every U-Net parameter, and runs in the caller's
thread (:func:`trainer.job.run`) while the caller sees each step.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lipschitz_personalize.trainer.config import TrainConfig
from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer.job import run as run_trainer
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer
from lipschitz_personalize.trainer.metrics import StepMetrics

from .diffusers_host import DiffusersSD15


class TrainingFailed(RuntimeError):
    """The run did not complete (diverged): the job is failed, its row not written."""


def make_trainer(model: DiffusersSD15, latents: Tensor, cond: Tensor, config: TrainConfig) -> RegularizedTrainer:
    """The trainer for ``model``'s U-Net on cached ``latents`` and one prompt embedding ``cond``."""
    dev = model.device
    data = CachedExamples(latents.to(dev).clone(), cond.to(dev).clone(), config.batch_size)
    checkpoint = model.checkpoint_units() if config.gradient_checkpointing else ()
    delta = ParameterDelta(model.unet, device=dev, dtype=config.delta_torch_dtype)
    return RegularizedTrainer(model.eps, delta, model.alphas_cumprod(), data, config, checkpoint=checkpoint)


def personalize(model: DiffusersSD15, images: Tensor, prompt: str, config: TrainConfig,
                on_step: Callable[[StepMetrics], None] = lambda m: None) -> RegularizedTrainer:
    """Train ``config.steps`` steps on ``images`` ([N, H, W, 3] in [0, 1], at the training
    resolution) with ``prompt``; returns the trainer, whose ``delta`` is the result."""
    config.validate()
    cond, _ = model.encode_prompt(prompt)
    latents = model.encode_images(images, config.seed)
    trainer = make_trainer(model, latents, cond, config)
    outcome = run_trainer(trainer, on_step)
    if outcome.status != "completed":
        raise TrainingFailed(f"training {outcome.status} at step {outcome.steps_done}: {outcome.message}")
    return trainer
