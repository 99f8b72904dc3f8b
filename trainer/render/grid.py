"""IMAGE batches -> one labelled comparison grid (``LipschitzLabeledGrid``; stock ComfyUI has none).

Each connected batch is one row (``images_1`` on top), its images are the columns.  Row labels
go in a column on the left (with the row's numbers under them when metrics are given), column
labels in a header row, an optional title above; black text in Pillow's default font on white.
Rows whose images differ in size from the first row are resized to the first row's cell size.

:func:`render_table` draws the metrics table (``LipschitzMetricsTable``) in the same style.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from .images import to_pil, to_tensor

MAX_ROWS = 8
PAD = 8


def parse_labels(text: str | None) -> list[str]:
    """One label per line; blank lines (e.g. a trailing newline) are ignored."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _font(cell_h: int) -> ImageFont.ImageFont:
    size = max(12, min(48, cell_h // 20))
    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a single over-long word stays on its own line)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and _text_size(draw, trial, font)[0] > width:
            lines.append(current)
            current = word
        else:
            current = trial
    if current:
        lines.append(current)
    return lines or [""]


def make_grid(rows: list[torch.Tensor], row_labels: list[str], column_labels: list[str],
              title: str = "", row_notes: list[list[str]] | None = None) -> torch.Tensor:
    """Rows of IMAGE batches [B, H, W, C] -> one IMAGE [1, H', W', 3].

    ``row_labels`` / ``column_labels`` may be empty (no label strip) or must match the
    number of rows / columns (the largest batch); otherwise ValueError names the input.
    ``row_notes``: lines printed under each row's label (its numbers), one list per row; a row
    grows taller than its images when they need the room.
    """
    if not rows:
        raise ValueError("images_1: connect at least one IMAGE batch")
    n_rows = len(rows)
    n_cols = max(int(r.shape[0]) for r in rows)
    if row_labels and len(row_labels) != n_rows:
        raise ValueError(f"row_labels: {len(row_labels)} label(s) for {n_rows} row(s) "
                         f"(one line per connected images_N input, or leave it empty)")
    if column_labels and len(column_labels) != n_cols:
        raise ValueError(f"column_labels: {len(column_labels)} label(s) for {n_cols} column(s) "
                         f"(one line per image of a batch, or leave it empty)")

    cell_h, cell_w = int(rows[0].shape[1]), int(rows[0].shape[2])
    font = _font(cell_h)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(scratch, "Ag|", font)[1] + 4

    max_label_w = max(140, cell_w // 2)
    wrapped_rows = [_wrap(scratch, t, font, max_label_w) if row_labels else [] for t in row_labels or [""] * n_rows]
    for lines, more in zip(wrapped_rows, row_notes or []):
        lines.extend(more)
    label_w = max((_text_size(scratch, line, font)[0] for lines in wrapped_rows for line in lines), default=-2 * PAD) + 2 * PAD
    row_h = [max(cell_h, len(lines) * line_h + 2 * PAD if lines else 0) for lines in wrapped_rows]
    wrapped_cols = [_wrap(scratch, t, font, cell_w - 2 * PAD) for t in column_labels]
    header_h = (max(len(lines) for lines in wrapped_cols) * line_h + 2 * PAD) if column_labels else 0
    wrapped_title = _wrap(scratch, title.strip(), font, label_w + n_cols * cell_w - 2 * PAD) if title and title.strip() else []
    title_h = len(wrapped_title) * line_h + 2 * PAD if wrapped_title else 0

    width = label_w + n_cols * cell_w
    height = title_h + header_h + sum(row_h)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    black = (0, 0, 0)

    for i, line in enumerate(wrapped_title):
        w = _text_size(draw, line, font)[0]
        draw.text(((width - w) // 2, PAD + i * line_h), line, fill=black, font=font)
    for c, lines in enumerate(wrapped_cols):
        x0 = label_w + c * cell_w
        for i, line in enumerate(lines):
            w = _text_size(draw, line, font)[0]
            draw.text((x0 + (cell_w - w) // 2, title_h + PAD + i * line_h), line, fill=black, font=font)
    top = title_h + header_h
    for r, batch in enumerate(rows):
        y0 = top + sum(row_h[:r])
        lines = wrapped_rows[r]
        y = y0 + (row_h[r] - len(lines) * line_h) // 2
        for i, line in enumerate(lines):
            draw.text((PAD, y + i * line_h), line, fill=black, font=font)
        for c in range(int(batch.shape[0])):
            img = to_pil(batch[c])
            if img.size != (cell_w, cell_h):
                img = img.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
            canvas.paste(img, (label_w + c * cell_w, y0))
    return to_tensor([canvas])


def render_table(header: list[str], body: list[list[str]], caption: list[str], title: str = "") -> torch.Tensor:
    """A table of strings -> IMAGE [1, H, W, 3]: the title, a shaded header row, one row per
    model (numbers right-aligned), the caption lines (which encoder, notes) wrapped below."""
    font = _font(400)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(scratch, "Ag|", font)[1] + 2 * PAD
    col_w = [max(_text_size(scratch, row[c], font)[0] for row in [header, *body]) + 3 * PAD for c in range(len(header))]
    width = max(sum(col_w), 480)
    title_lines = _wrap(scratch, title.strip(), font, width - 2 * PAD) if title.strip() else []
    notes = [line for text in caption for line in _wrap(scratch, text, font, width - 2 * PAD)]
    table_top = len(title_lines) * line_h
    height = table_top + (len(body) + 1) * line_h + len(notes) * line_h + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    black, grey = (0, 0, 0), (90, 90, 90)
    for i, line in enumerate(title_lines):
        draw.text(((width - _text_size(draw, line, font)[0]) // 2, i * line_h + PAD), line, fill=black, font=font)
    draw.rectangle((0, table_top, width, table_top + line_h), fill=(225, 225, 225))
    for r, row in enumerate([header, *body]):
        y = table_top + r * line_h
        x = 0
        for c, text in enumerate(row):
            tx = x + PAD if c == 0 else x + col_w[c] - PAD - _text_size(draw, text, font)[0]
            draw.text((tx, y + PAD), text, fill=black, font=font)
            x += col_w[c]
        draw.line((0, y + line_h, width, y + line_h), fill=(180, 180, 180))
    y = table_top + (len(body) + 1) * line_h
    for i, line in enumerate(notes):
        draw.text((PAD, y + i * line_h + PAD // 2), line, fill=grey, font=font)
    return to_tensor([canvas])
