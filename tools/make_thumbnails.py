#!/usr/bin/env python3
"""The template browser's thumbnails (``workflows/<name>.jpg``, 512x512) from the screenshots the
browser test takes of each bundled workflow (``tests/artifacts/browser/template_<name>.png``,
the whole graph in the view).

Why from the test: the screenshot is the frontend's own drawing of the shipped file, so a
thumbnail shows what the user opens. The frontend's bars (tabs, breadcrumb, side bar) are cut
off, as are the minimap and the canvas info, and the drawn graph is fitted into a square on the
canvas's own background colour.

    .venv/bin/python -m pytest -q tests/test_browser.py -k bundled   # writes the screenshots
    .venv/bin/python tools/make_thumbnails.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "tests" / "artifacts" / "browser"
SIZE = 512
CANVAS = (60, 131, 1920, 1200)  # what frontend 1.32.9 leaves of a 1920x1200 page to the graph
# Drawn over the graph: the minimap and zoom buttons (bottom right), the canvas info (bottom left).
OVERLAYS = ((1600, 930, 1920, 1200), (0, 1100, 200, 1200))
MARGIN = 16


def thumbnail(shot: Path) -> Image.Image:
    """The drawn graph (what differs from the canvas background, overlays left out) in a square."""
    with Image.open(shot) as im:
        page = np.asarray(im.convert("RGB")).astype(np.int16)
    colours, counts = np.unique(page.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()]
    drawn = np.abs(page - background).max(axis=2) > 12
    for x0, y0, x1, y1 in OVERLAYS:
        drawn[y0:y1, x0:x1] = False
        page[y0:y1, x0:x1] = background
    left, top, right, bottom = CANVAS
    drawn[:top], drawn[:, :left], drawn[bottom:], drawn[:, right:] = False, False, False, False
    ys, xs = np.nonzero(drawn)
    box = (xs.min() - MARGIN, ys.min() - MARGIN, xs.max() + MARGIN, ys.max() + MARGIN)
    graph = Image.fromarray(page.astype(np.uint8)).crop(box)
    side = max(graph.size)
    square = Image.new("RGB", (side, side), tuple(int(c) for c in background))
    square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
    return square.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> int:
    missing = []
    for workflow in sorted((REPO / "workflows").glob("*.json")):
        shot = SHOTS / f"template_{workflow.stem}.png"
        if not shot.is_file():
            missing.append(shot)
            continue
        thumbnail(shot).save(workflow.with_suffix(".jpg"), quality=85, optimize=True)
        print(f"wrote {workflow.with_suffix('.jpg').relative_to(REPO)}")
    for shot in missing:
        print(f"no screenshot {shot.relative_to(REPO)}: run the browser test first", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
