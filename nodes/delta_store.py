"""DELTA and TRAINING_LOG values, their files, and the on-disk cache of finished runs.

Files live in ComfyUI's ``models/lipschitz_deltas/`` folder:

* ``auto_<key>.safetensors`` - a finished personalization, keyed by a hash of the image
  bytes, prompt(s), hyperparameters and base-model fingerprint, loaded instead of retraining;
* ``partial_<key>.safetensors`` - a run stopped early (cancel, interrupt, divergence, error),
  with its Adam state and generator so that ``resume`` continues it exactly;
* whatever ``LipschitzSaveDelta`` writes.

Delta tensors use the keys ``diffusion_model.<module>.diff`` / ``.diff_b``, which stock
``LoraLoaderModelOnly`` loads.  Every write is atomic and checksummed (:mod:`trainer.persist`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

import folder_paths

from ..trainer.persist import CorruptFileError, load_verified, save_verified

from .comfy_adapter import NodeInputError, file_key

FOLDER = "lipschitz_deltas"
PACK_VERSION = "0.1.0"
FORMAT = "lipschitz-delta/1"


STALE_TMP_SECONDS = 600


def delta_dir() -> Path:
    """``models/lipschitz_deltas`` registered with ComfyUI (safetensors only).

    On first use in a process, temporary files that a killed writer left behind (never
    loadable, up to a few hundred MB each) are removed once they are clearly abandoned.
    """
    path = Path(folder_paths.models_dir) / FOLDER
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([str(path)], {".safetensors"})
        path.mkdir(parents=True, exist_ok=True)
        for tmp in path.glob(".*.tmp"):
            if time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink(missing_ok=True)
    return path


def delta_files() -> list[str]:
    delta_dir()
    return sorted(folder_paths.get_filename_list(FOLDER))


@dataclass
class TrainingLog:
    """Per-step metrics of one run, labelled for the report."""

    label: str
    lam: float
    steps: list[int] = field(default_factory=list)
    denoise: list[float] = field(default_factory=list)
    lip: list[float] = field(default_factory=list)
    delta_norm: list[float] = field(default_factory=list)
    status: str = "completed"

    def add(self, metrics: dict[str, Any]) -> None:
        self.steps.append(int(metrics["step"]))
        self.denoise.append(float(metrics["denoise"]))
        self.lip.append(float(metrics["lip"]))
        self.delta_norm.append(float(metrics["delta_norm"]))

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "TrainingLog":
        return cls(**json.loads(text))


@dataclass
class Delta:
    """A trained delta: U-Net parameter name -> fp32 CPU tensor, plus what produced it."""

    tensors: dict[str, Tensor]
    meta: dict[str, str]

    @property
    def steps_done(self) -> int:
        return int(self.meta.get("steps_done", 0))

    def file_tensors(self) -> dict[str, Tensor]:
        return {file_key(name): t for name, t in self.tensors.items()}


def run_key(parts: dict[str, Any], tensors: list[Tensor]) -> str:
    """Hash identifying a run: images' bytes, prompts, hyperparameters, base fingerprint."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def auto_path(key: str) -> Path:
    return delta_dir() / f"auto_{key}.safetensors"


def partial_path(key: str) -> Path:
    return delta_dir() / f"partial_{key}.safetensors"


def save_delta(path: Path, delta: Delta, extra: dict[str, Tensor] | None = None, log: TrainingLog | None = None) -> Path:
    meta = {**delta.meta, "format": FORMAT, "pack_version": PACK_VERSION}
    if log is not None:
        meta["training_log"] = log.to_json()
    return save_verified(path, {**delta.file_tensors(), **(extra or {})}, meta)


def load_delta_file(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Delta, dict[str, Tensor], TrainingLog | None]:
    """Load a delta for a U-Net whose parameters have ``shapes``; wrong keys/shapes are refused.

    Returns the delta, the non-delta tensors (a partial run's resume state) and its log.
    """
    try:
        tensors, meta = load_verified(path)
    except CorruptFileError as exc:
        raise NodeInputError("delta_file", str(exc), "Delete the file and train again") from exc
    by_key = {file_key(n): n for n in shapes}
    delta = {by_key[k]: t.float() for k, t in tensors.items() if k in by_key}
    extra = {k: t for k, t in tensors.items() if k not in by_key}
    unknown = [k for k in extra if k.startswith("diffusion_model.")]
    if unknown or not delta:
        raise NodeInputError("delta_file", f"{path.name} has keys this U-Net does not have (e.g. {unknown[:2]})"
                             if unknown else f"{path.name} holds no U-Net delta",
                             "Use a delta trained on an SD1.5 model with this pack")
    for name, t in delta.items():
        if tuple(t.shape) != tuple(shapes[name]):
            raise NodeInputError("delta_file", f"{path.name}: tensor {name} has shape {tuple(t.shape)}, "
                                 f"the model has {tuple(shapes[name])}",
                                 "Use a delta trained on this SD1.5 architecture")
    log = TrainingLog.from_json(meta["training_log"]) if "training_log" in meta else None
    return Delta(delta, meta), extra, log


def safe_filename(prefix: str) -> str:
    """A user-given file name prefix reduced to a safe single path component."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(prefix.strip())).strip("._")
    return name[:80] or "lipschitz_delta"


def next_free(prefix: str) -> Path:
    base = safe_filename(prefix)
    folder = delta_dir()
    n = 1
    while (folder / f"{base}_{n:05d}.safetensors").exists():
        n += 1
    return folder / f"{base}_{n:05d}.safetensors"

