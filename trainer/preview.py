"""Previews during training: which prompts, at which steps, and how far each drifted from the base.

A preview samples a few prompts from the current delta with fixed seeds, next to the base
model's image of the same prompt and seed (sampled once, before the first step).  The first
prompt is the instance prompt (is the subject there yet); the others are drift probes (prompts
without the rare token: has the model forgotten what the class looks like).  The drift number is
the root-mean-square pixel distance of the probes from the base's images, in the IMAGE range
[0, 1] (0: the base's image exactly), or, with an evaluation encoder, one minus the cosine of
their features (the drift metric's paired cosine, turned into a distance: 0 is no drift).  The
host does the sampling (it needs the host's sampler); this module is the part that is the
method's: what is shown and measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .evaluation.scores import paired_cosine

DEFAULT_EVERY = 100
"""Steps between previews.  At the paper's 1000 steps and the default preview (two prompts, 20
sampler steps with CFG, 256 px) ten previews plus the base's stay under 10% of the training time:
docs/preview.md gives the measured ratio."""
DEFAULT_SAMPLER_STEPS = 20
DEFAULT_SIZE = 256
SAMPLER = ("euler", "normal", 7.0)
"""Sampler, scheduler and CFG scale: a sampler that draws no noise after the first, so the
preview's only randomness is its fixed seed."""


@dataclass(frozen=True)
class PreviewSettings:
    """What the node was asked to preview."""

    every: int
    prompts: tuple[str, ...]
    sampler_steps: int
    size: int
    seed: int

    def steps(self, first: int, total: int) -> list[int]:
        """The training steps after ``first`` (a resumed run's start) up to ``total`` that get a
        preview: every ``every``-th step (none when ``every`` is 0)."""
        if self.every <= 0:
            return []
        return list(range((first // self.every + 1) * self.every, total + 1, self.every))


def default_prompts(instance: str, class_prompt: str = "") -> tuple[str, ...]:
    """The instance prompt, and the same prompt without the rare token: the class prompt where the
    run has one, else the instance prompt less the word before its last word (DreamBooth's
    ``a [V] [class]`` form: "a photo of sks dog" -> "a photo of dog")."""
    instance = " ".join(instance.split())
    if class_prompt.strip():
        return instance, " ".join(class_prompt.split())
    words = instance.split(" ")
    if len(words) < 2:
        return (instance,)
    return instance, " ".join(words[:-2] + words[-1:])


def parse_prompts(text: str, instance: str, class_prompt: str = "") -> tuple[str, ...]:
    """The node's ``preview_prompts`` (one per line; empty: :func:`default_prompts`)."""
    lines = tuple(" ".join(line.split()) for line in text.splitlines() if line.strip())
    return lines or default_prompts(instance, class_prompt)


def pixel_distance(image: Tensor, base: Tensor) -> float:
    """Root-mean-square distance of two IMAGE tensors (``[B, H, W, C]`` in [0, 1])."""
    if image.shape != base.shape:
        raise ValueError(f"image {tuple(image.shape)} and base {tuple(base.shape)} differ in shape")
    return float((image.double() - base.double()).square().mean().sqrt())


def drift(images: list[Tensor], bases: list[Tensor], embed: Callable[[Tensor], Tensor] | None = None) -> float | None:
    """How far the drift probes (every prompt but the first) are from the base's images: the mean
    :func:`pixel_distance`, or with ``embed`` (an encoder's image features) ``1 -`` their mean
    paired cosine; ``None`` when there is no probe."""
    pairs = list(zip(images[1:], bases[1:], strict=True))
    if not pairs:
        return None
    if embed is None:
        return sum(pixel_distance(i, b) for i, b in pairs) / len(pairs)
    return 1.0 - paired_cosine(embed(torch.cat([i for i, _ in pairs])), embed(torch.cat([b for _, b in pairs])))

