#!/usr/bin/env python3
"""Draw the pack's Registry icon, ``docs/icon.png`` (square PNG, 256 px; the Registry takes up to 400).

The picture is the method in one glance: a base curve (grey) and a personalized curve (orange)
that follows it inside a narrow band (the L2-to-base term keeping the fine-tune near theta0).
Run once after changing the drawing and commit the PNG: ``python tools/make_icon.py``.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
OUT = Path(__file__).resolve().parent.parent / "docs" / "icon.png"


def draw(size: int = SIZE) -> Image.Image:
    """The icon at ``size`` x ``size`` pixels (drawn 4x larger, then downsampled for smooth lines)."""
    s = size * 4
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 6, fill=(24, 28, 38, 255))
    margin, mid, amp = s * 0.14, s * 0.52, s * 0.2

    def curve(offset: float, wobble: float) -> list[tuple[float, float]]:
        pts = []
        for i in range(121):
            x = margin + (s - 2 * margin) * i / 120
            t = 2 * math.pi * i / 120
            pts.append((x, mid - amp * math.sin(t) + offset + wobble * math.sin(5 * t)))
        return pts

    band = curve(-s * 0.06, 0) + curve(s * 0.06, 0)[::-1]
    d.polygon(band, fill=(79, 195, 247, 70))
    d.line(curve(0, 0), fill=(160, 170, 185, 255), width=s // 40, joint="curve")
    d.line(curve(0, s * 0.03), fill=(255, 183, 77, 255), width=s // 28, joint="curve")
    return img.resize((size, size), Image.LANCZOS)


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    draw().save(OUT, optimize=True)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
