"""The micro-world's pictures and captions, drawn with numpy from a seed (no files, no network).

A picture is one shape (circle, square, triangle) in one colour (red, green, blue, yellow) on a
light background, at 64x64 px, with random position, size and background tint; its caption is
``"a photo of a red circle"``.  These twelve concepts are what the base model learns.

Patterned shapes (two-colour stripes, in colours the base never sees) exist too: the VAE and
the evaluation encoder learn them so that they can represent and tell apart a subject the base
model never saw.  The subject (``sks square``) is one of them: an orange-and-purple striped
square.

Everything here is deterministic from the seed: numpy's PCG64 draws and float32/float64
arithmetic that does not depend on the machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.65, 0.15), "blue": (0.12, 0.2, 0.85),
          "yellow": (0.95, 0.85, 0.1)}
# Colours only patterned shapes use: the base model never sees them.
PATTERN_COLORS = {"orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.1, 0.6), "cyan": (0.1, 0.8, 0.85),
                  "black": (0.08, 0.08, 0.08), "white": (0.98, 0.98, 0.98), "pink": (1.0, 0.55, 0.75)}
ALL_COLORS = {**COLORS, **PATTERN_COLORS}
CONCEPTS = [(c, s) for s in SHAPES for c in COLORS]  # the base model's 12 concepts
SUBJECT = ("orange", "purple", "square")             # stripes of two colours, shape
SUBJECT_TOKEN = "sks"
_SUPER = 4  # supersampling factor (anti-aliased edges)


@dataclass(frozen=True)
class Item:
    """One picture's content: shape, main colour, optional second stripe colour, layout."""

    shape: str
    color: str
    stripe: str | None = None
    cx: float = 32.0
    cy: float = 32.0
    r: float = 18.0
    background: tuple[float, float, float] = (0.93, 0.93, 0.93)


def caption(item: Item) -> str:
    if item.stripe:
        return f"a photo of a {item.color} and {item.stripe} striped {item.shape}"
    return f"a photo of a {item.color} {item.shape}"


def concept_prompt(color: str, shape: str) -> str:
    return f"a photo of a {color} {shape}"


def _mask(item: Item) -> np.ndarray:
    n = SIZE * _SUPER
    y, x = (np.mgrid[0:n, 0:n].astype(np.float64) + 0.5) / _SUPER
    dx, dy = x - item.cx, y - item.cy
    r = item.r
    if item.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if item.shape == "square":
        h = r * 0.85
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if item.shape == "triangle":  # pointing up, base at cy + r/2
        top, bottom = item.cy - r, item.cy + 0.6 * r
        half = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half)
    raise ValueError(f"unknown shape {item.shape!r}")


def render(item: Item) -> np.ndarray:
    """``[64, 64, 3]`` float32 in [0, 1]."""
    n = SIZE * _SUPER
    img = np.empty((n, n, 3), np.float64)
    img[:] = item.background
    mask = _mask(item)
    fill = np.empty((n, n, 3), np.float64)
    fill[:] = ALL_COLORS[item.color]
    if item.stripe:  # horizontal stripes 6 px wide
        y = np.mgrid[0:n, 0:n][0] / _SUPER
        band = (np.floor((y - (item.cy - item.r)) / 6.0).astype(np.int64) % 2) == 1
        fill[band] = ALL_COLORS[item.stripe]
    img[mask] = fill[mask]
    img = img.reshape(SIZE, _SUPER, SIZE, _SUPER, 3).mean(axis=(1, 3))
    return img.astype(np.float32)


def random_item(rng: np.random.Generator, shape: str, color: str, stripe: str | None = None,
                jitter: float = 6.0) -> Item:
    """Size 15-19 px (radius), centre within ``jitter`` px of the middle: a world small
    enough to learn in minutes on a CPU."""
    r = float(rng.uniform(15, 19))
    cx, cy = (float(v) for v in SIZE / 2 + rng.uniform(-jitter, jitter, size=2))
    bg = float(rng.uniform(0.82, 1.0))
    tint = rng.uniform(-0.04, 0.04, size=3)
    background = tuple(float(np.clip(bg + t, 0, 1)) for t in tint)
    return Item(shape, color, stripe, cx, cy, r, background)


def base_items(rng: np.random.Generator, n: int) -> list[Item]:
    """``n`` pictures of the base model's concepts, cycling through all twelve."""
    return [random_item(rng, CONCEPTS[i % len(CONCEPTS)][1], CONCEPTS[i % len(CONCEPTS)][0]) for i in range(n)]


def patterned_items(rng: np.random.Generator, n: int) -> list[Item]:
    """``n`` striped pictures in random colour pairs (the subject's pair included)."""
    names = list(ALL_COLORS)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        out.append(random_item(rng, SHAPES[int(rng.integers(len(SHAPES)))], names[int(a)], names[int(b)]))
    return out


def subject_items(seed: int = 7, n: int = 5) -> list[Item]:
    rng = np.random.default_rng(seed)
    color, stripe, shape = SUBJECT
    return [random_item(rng, shape, color, stripe) for _ in range(n)]


def render_batch(items: list[Item]) -> np.ndarray:
    return np.stack([render(it) for it in items])
