"""Previews during training (:mod:`trainer.preview`) with ComfyUI's sampler, between two steps.

The preview samples the training's own U-Net patcher while the run keeps its delta applied
(:meth:`trainer.loop.RegularizedTrainer.running`): every layer computes ``theta0 + delta`` as
the training step does, which is the arithmetic of the node's MODEL output with
``sampling=exact``.  A MODEL clone carrying the delta as a patch (the output's default) would
instead re-patch the shared weights mid-run and hold a second copy of them on the device; the
difference is the rounding of ``theta0 + delta`` to the model's fp16 on GPUs, which the node's
sampling note measures after the run.  The base model's images are sampled by the same patcher
before the first step (no delta applied yet), with the same prompts and seeds.

Nothing here touches the training's randomness: the sampler draws its noise from its own
seeded generator and the process's RNG is forked around it, so a run with previews ends with
bitwise the delta of a run without.  An interrupt lands in the sampler's layers (ComfyUI checks
it in every op) and propagates out of the step callback as it would out of a step.
"""
from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import comfy.model_management
import comfy.sample

from ...trainer.evaluation.evaluate import on_device
from ...trainer.memory import GB
from ...trainer.preview import SAMPLER, PreviewSettings, drift
from ...trainer.render.images import to_pil
from .progress import NodeProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreviewMemory:
    """What the memory plan leaves a preview, and whether the U-Net's own weights are on the
    device (they are not where theta0 is read from the checkpoint file)."""

    budget: float
    """Bytes a pause between two steps may use: :func:`trainer.memory.between_steps`."""
    weights_resident: bool


class Previewer:
    """Samples :class:`PreviewSettings` prompts with the base (:meth:`start`) and at each preview
    step with the current delta (:meth:`__call__`), and shows them through ``progress``.  The
    prompts are encoded when it is made, before the training loads its U-Net.  With an
    evaluation ``encoder`` (the metric nodes' CLIP or DINO) the drift is measured in its feature
    space; it is lent the device for that and put back on the CPU."""

    def __init__(self, settings: PreviewSettings, clip: Any, vae: Any, progress: NodeProgress,
                 encoder: Any = None) -> None:
        self.settings, self.vae, self.progress, self.encoder = settings, vae, progress, encoder
        self.drift_kind = "pixels" if encoder is None else f"1 - cosine, {encoder.file}"
        """What the drift measures, for the chart's label."""
        self.patcher: Any = None
        self.due: set[int] = set()
        self.base: list[Tensor] = []
        self.base_urls: list[str] = []
        self.negative = _encode(clip, "")
        self.positive = [_encode(clip, p) for p in settings.prompts]

    def need(self, weights_resident: bool) -> float:
        """Peak bytes of one preview on the device: the sampler's activations (ComfyUI's own
        estimate for a CFG batch of 2), the VAE decode's, and on a GPU the VAE's weights and the
        U-Net's when the run does not hold them there."""
        side = self.settings.size // 8
        need = self.patcher.model.memory_required([2, 4, side, side])
        need += self.vae.memory_used_decode([1, 4, side, side], self.vae.vae_dtype)
        if torch.device(self.patcher.load_device).type != "cpu":
            need += self.vae.model_size() + (0 if weights_resident else self.patcher.model_size())
            if self.encoder is not None:
                need += sum(p.numel() * p.element_size() for p in self.encoder.model.parameters())
        return float(need)

    def start(self, patcher: Any, first: int, total: int, memory: PreviewMemory) -> str | None:
        """Plan the previews of steps ``first+1..total`` on the training's ``patcher`` (loaded, no
        delta applied yet) and sample the base's images; the node's note when the previews are
        off for this run because they would not fit the plan."""
        self.patcher = patcher
        steps = self.settings.steps(first, total)
        if not steps:
            return None
        need = self.need(memory.weights_resident)
        if need > memory.budget:
            note = (f"preview: skipped for this run: a preview needs about {need / GB:.2f} GB and the memory plan "
                    f"leaves {memory.budget / GB:.2f} GB between steps (lower preview_size, or choose a leaner memory mode)")
            log.warning("LipschitzPersonalize: %s", note)
            return note
        self.due = set(steps)
        self.base = self._sample_all()
        self.base_urls = [data_url(i) for i in self.base]
        self._publish(first, self.base, 0.0)
        return None

    def __call__(self, step: int) -> None:
        """The preview of training step ``step``, if it is one (called after each step)."""
        if step not in self.due:
            return
        images = self._sample_all()
        self._publish(step, images, self._drift(images))

    def _drift(self, images: list[Tensor]) -> float | None:
        if self.encoder is None:
            return drift(images, self.base)
        with on_device([self.encoder], torch.device(self.patcher.load_device)):
            return drift(images, self.base, self.encoder.embed_images)

    def _publish(self, step: int, images: list[Tensor], value: float | None) -> None:
        self.progress.preview(step, list(self.settings.prompts), [data_url(i) for i in images], self.base_urls, value,
                              self.drift_kind)

    def _sample_all(self) -> list[Tensor]:
        """One IMAGE per prompt, each from its own fixed seed; the models a preview loaded on a GPU
        are unloaded again so the training keeps the memory it planned."""
        device = torch.device(self.patcher.load_device)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            images = [self._sample(pos, self.settings.seed + i) for i, pos in enumerate(self.positive)]
        if device.type != "cpu":
            keep = [m for m in comfy.model_management.current_loaded_models if m.model is self.patcher]
            comfy.model_management.free_memory(1e30, device, keep_loaded=keep)
        return images

    def _sample(self, positive: list, seed: int) -> Tensor:
        side = self.settings.size // 8
        latent = torch.zeros([1, 4, side, side])
        sampler, scheduler, cfg = SAMPLER
        samples = comfy.sample.sample(self.patcher, comfy.sample.prepare_noise(latent, seed), self.settings.sampler_steps,
                                      cfg, sampler, scheduler, positive, self.negative, latent, seed=seed, disable_pbar=True)
        return self.vae.decode(samples)[..., :3].float().cpu()


def _encode(clip: Any, text: str) -> list:
    """``CLIPTextEncode``'s conditioning of ``text``."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def data_url(image: Tensor) -> str:
    """An IMAGE ``[1, H, W, C]`` as a PNG data URL: the events and the status route carry the
    images themselves (no file is written, nothing to clean up)."""
    buffer = io.BytesIO()
    to_pil(image[0]).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
