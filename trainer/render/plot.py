"""Line charts drawn with Pillow (no plotting library): the training report's panels."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .images import to_tensor

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]
Series = tuple[str, Sequence[float], Sequence[float]]  # label, x, y


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits - 1}e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.{digits}g}"


def _labels(values: Sequence[float]) -> list[str]:
    """Tick labels with as many significant digits as it takes to tell them apart (a metric
    that moves in its fourth digit would otherwise read 0.3, 0.3, 0.3)."""
    for digits in range(3, 9):
        labels = [_fmt(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: Sequence[Series]) -> None:
    """One chart: frame, title, y ticks, one coloured line per series (shared axes)."""
    font = ImageFont.load_default()
    x0, y0, x1, y1 = box
    left, top, right, bottom = x0 + 70, y0 + 24, x1 - 10, y1 - 24
    draw.text((x0 + 8, y0 + 4), title, fill=(0, 0, 0), font=font)
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not pts:
        draw.text((left + 10, top + 10), "no data", fill=(0, 0, 0), font=font)
        return
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + abs(ymin) * 0.1 + 1e-12)
    sx = lambda x: left + (x - xmin) / (xmax - xmin) * (right - left)  # noqa: E731
    sy = lambda y: bottom - (y - ymin) / (ymax - ymin) * (bottom - top)  # noqa: E731
    ticks = _ticks(ymin, ymax)
    for v, label in zip(ticks, _labels(ticks)):
        draw.line((left - 4, sy(v), left, sy(v)), fill=(0, 0, 0))
        draw.text((x0 + 4, sy(v) - 5), label, fill=(0, 0, 0), font=font)
    for v in sorted({round(v) for v in _ticks(xmin, xmax)}):  # steps are whole numbers
        draw.text((sx(v) - 8, bottom + 6), str(v), fill=(0, 0, 0), font=font)
    for i, (_, xs, ys) in enumerate(series):
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=COLOURS[i % len(COLOURS)], width=2)
        elif line:
            draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=COLOURS[i % len(COLOURS)])


def report(panels: Sequence[tuple[str, Sequence[Series]]], width: int = 900, panel_height: int = 220) -> Image.Image:
    """Stacked panels with one legend on top (labels in the series' colours)."""
    labels = [label for label, _, _ in panels[0][1]] if panels else []
    legend_h = 28
    img = Image.new("RGB", (width, legend_h + panel_height * len(panels)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x = 70
    for i, label in enumerate(labels):
        c = COLOURS[i % len(COLOURS)]
        draw.rectangle((x, 9, x + 14, 19), fill=c)
        draw.text((x + 20, 8), label, fill=(0, 0, 0), font=ImageFont.load_default())
        x += 30 + 7 * len(label)
    for i, (title, series) in enumerate(panels):
        panel(draw, (0, legend_h + i * panel_height, width, legend_h + (i + 1) * panel_height), title, series)
    return img


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average: the per-step loss of batch 1 is very noisy."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else (1 - alpha) * out[-1] + alpha * v)
    return out


def render_report(logs: Sequence[Any]) -> torch.Tensor:
    """:class:`trainer.metrics.TrainingLog` values -> one IMAGE [1, H, W, 3]: the denoise loss
    (smoothed), ``L_lip`` and ``||delta||`` over steps, one line per run."""
    def lines(field: str, smooth: bool = False) -> list[Series]:
        return [(log.label, log.series("step"), ema(log.series(field)) if smooth else log.series(field))
                for log in logs]

    img = report([("denoise loss (EMA 0.1)", lines("denoise", smooth=True)),
                  ("L_lip = sum_i mean(delta_i^2)", lines("lip")), ("||delta||", lines("delta_norm"))])
    return to_tensor([img])
