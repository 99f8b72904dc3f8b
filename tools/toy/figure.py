"""``toy.png``: one scatter panel per setting (and the pre-trained model), drawn with Pillow."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .data import HIT_RADIUS, NEW_CLASS, centres

# One colour per class (0..4 the base classes, 5 the new one), as RGB.
COLOURS = [(31, 60, 160), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (0, 0, 0)]


def draw_figure(panels: Sequence[tuple[str, Tensor, Tensor]], path: Path, extent: float = 5.0) -> None:
    """Scatter panels in a grid, shared axes ``[-extent, extent]^2``, one colour per class."""
    size, margin, title_h, cols = 300, 30, 28, 4
    rows = math.ceil(len(panels) / cols)
    legend_h = 34
    width = cols * (size + 2 * margin)
    height = rows * (size + 2 * margin + title_h) + legend_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=15)
        small = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()

    def to_px(ox: int, oy: int, px: float, py: float) -> tuple[float, float]:
        return ox + (px + extent) / (2 * extent) * size, oy + (extent - py) / (2 * extent) * size

    for k, (title, xs, labels) in enumerate(panels):
        r, c = divmod(k, cols)
        ox = c * (size + 2 * margin) + margin
        oy = r * (size + 2 * margin + title_h) + title_h + margin // 2
        draw.text((ox + size / 2, oy - 6), title, fill="black", font=font, anchor="md")
        for tick in range(-int(extent), int(extent) + 1, 2 if extent > 3 else 1):
            tx, ty = to_px(ox, oy, tick, -extent)
            draw.line([(tx, ty), (tx, ty + 4)], fill="black")
            draw.text((tx, ty + 5), str(tick), fill="black", font=small, anchor="mt")
            lx, ly = to_px(ox, oy, -extent, tick)
            draw.line([(lx - 4, ly), (lx, ly)], fill="black")
            draw.text((lx - 6, ly), str(tick), fill="black", font=small, anchor="rm")
        for cx, cy in centres().tolist():
            px, py = to_px(ox, oy, cx, cy)
            draw.ellipse([px - HIT_RADIUS / (2 * extent) * size, py - HIT_RADIUS / (2 * extent) * size,
                          px + HIT_RADIUS / (2 * extent) * size, py + HIT_RADIUS / (2 * extent) * size],
                         outline=(200, 200, 200))
        for (px, py), lab in zip(xs.tolist(), labels.tolist()):
            if abs(px) > extent or abs(py) > extent:
                continue
            qx, qy = to_px(ox, oy, px, py)
            draw.rectangle([qx - 1, qy - 1, qx, qy], fill=COLOURS[lab])
        draw.rectangle([ox, oy, ox + size, oy + size], outline="black")
    ly = height - legend_h // 2
    for cls, colour in enumerate(COLOURS):
        lx = margin + cls * 130
        draw.rectangle([lx, ly - 5, lx + 10, ly + 5], fill=colour)
        name = f"class {cls}" + (" (new)" if cls == NEW_CLASS else "")
        draw.text((lx + 16, ly), name, fill="black", font=font, anchor="lm")
    draw.text((width - margin, ly), f"circles: radius {HIT_RADIUS:g} around the class centres",
              fill="black", font=small, anchor="rm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
