"""The delta file: a trained delta (and, for a stopped run, its resume state) as safetensors.

Delta tensors use the keys ``diffusion_model.<module>.diff`` / ``.diff_b``, which stock
``LoraLoaderModelOnly`` loads, in the run's ``delta_dtype`` (fp16 by default: half the size of
fp32; the MODEL a run returns carries exactly these stored values, so a reloaded run samples
the same).  The metadata says what produced it (lambda, steps, learning rate, prompt, base
fingerprint, pack version) and carries the run's training log.  A stopped run adds its Adam
moments and generator (:func:`trainer.persist.flatten_trainer_state` names): exact with
``delta_dtype=fp32`` (``resume`` continues bitwise), 8-bit otherwise (a stopped SD1.5 run then
costs about twice its delta instead of six times).  Every write is atomic and checksummed
(:mod:`trainer.persist`).  Where the files live is :mod:`.folders`' business.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..metrics import TrainingLog
from ..persist import (BLOCK, CorruptFileError, flatten_trainer_state, load_verified, save_verified,
                                unflatten_trainer_state)
from ..errors import NodeInputError

PATCH_PREFIX = "diffusion_model."
PACK_VERSION = "0.1.0"
FORMAT = "lipschitz-delta/1"
DELTA_PREFIX = "delta."  # trainer state names of the delta tensors (stored under their diff keys)
DELTA_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_DELTA_DTYPE = "fp16"


@dataclass
class TrainedDelta:
    """A trained delta (U-Net parameter name -> CPU tensor) and what produced it: the DELTA value."""

    tensors: dict[str, Tensor]
    meta: dict[str, str]

    @property
    def steps_done(self) -> int:
        return int(self.meta.get("steps_done", 0))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def moment_format(delta_dtype: str) -> str:
    """How a stopped run's Adam moments are stored: exactly with fp32 deltas, else in 8 bits."""
    return "fp32" if delta_dtype == "fp32" else "fp8"


def file_nbytes(delta: TrainedDelta, moments: str | None = None) -> int:
    """About what :func:`save_delta_file` writes: the delta, plus two moments for a stopped run."""
    per_value = {None: 0.0, "fp32": 8.0, "fp8": 2.0 + 8.0 / BLOCK}[moments]  # two moments, + their scales
    return delta.nbytes + int(per_value * sum(t.numel() for t in delta.tensors.values()))


def file_key(name: str) -> str:
    """U-Net parameter name -> the key stock ``LoraLoaderModelOnly`` reads as a diff."""
    if name.endswith(".weight"):
        return f"{PATCH_PREFIX}{name[: -len('.weight')]}.diff"
    if name.endswith(".bias"):
        return f"{PATCH_PREFIX}{name[: -len('.bias')]}.diff_b"
    return f"{PATCH_PREFIX}{name}.diff"


def param_name(key: str) -> str | None:
    """The inverse of :func:`file_key`: a diff key -> its U-Net parameter name; ``None`` for any
    other key (a stopped run's resume state)."""
    if not key.startswith(PATCH_PREFIX):
        return None
    module, _, kind = key[len(PATCH_PREFIX):].rpartition(".")
    return {"diff": f"{module}.weight", "diff_b": f"{module}.bias"}.get(kind) if module else None


def run_key(parts: dict[str, Any], tensors: list[Tensor]) -> str:
    """Hash identifying a run: images' bytes, prompts, hyperparameters, base fingerprint."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def save_delta_file(path: Path, delta: TrainedDelta, log: TrainingLog | None = None,
                    trainer_state: Mapping[str, Any] | None = None, moments: str = "fp32") -> Path:
    """Write ``delta`` (and a stopped run's ``RegularizedTrainer.state_dict()``, its Adam
    moments in ``moments`` format) to ``path``."""
    tensors = {file_key(name): t for name, t in delta.tensors.items()}
    meta = {**delta.meta, "format": FORMAT, "pack_version": PACK_VERSION}
    if trainer_state is not None:
        state, state_meta = flatten_trainer_state(trainer_state, list(delta.tensors), moments)
        tensors.update({k: v for k, v in state.items() if not k.startswith(DELTA_PREFIX)})
        meta.update(state_meta)
    if log is not None:
        meta["training_log"] = log.to_json()
    return save_verified(path, tensors, meta)


def load_delta_file(path: Path, shapes: Mapping[str, tuple[int, ...]]
                    ) -> tuple[TrainedDelta, TrainingLog | None, dict[str, Tensor]]:
    """A delta for a U-Net whose parameters have ``shapes``: wrong keys, shapes or checksums are
    refused.  Returns the delta, its log and the other tensors (a stopped run's resume state)."""
    try:
        tensors, meta = load_verified(path)
    except CorruptFileError as exc:
        raise NodeInputError("delta_file", str(exc), "Delete the file and train again") from exc
    by_key = {file_key(n): n for n in shapes}
    delta = {by_key[k]: t for k, t in tensors.items() if k in by_key}
    extra = {k: t for k, t in tensors.items() if k not in by_key}
    unknown = [k for k in extra if k.startswith(PATCH_PREFIX)]
    if unknown or not delta:
        raise NodeInputError("delta_file", f"{path.name} has keys this U-Net does not have (e.g. {unknown[:2]})"
                             if unknown else f"{path.name} holds no U-Net delta",
                             "Use a delta trained on an SD1.5 model with this pack")
    for name, t in delta.items():
        if not t.is_floating_point():
            raise NodeInputError("delta_file", f"{path.name}: tensor {name} is {t.dtype}, not a float",
                                 "Use a delta trained on an SD1.5 model with this pack")
        if tuple(t.shape) != tuple(shapes[name]):
            raise NodeInputError("delta_file", f"{path.name}: tensor {name} has shape {tuple(t.shape)}, "
                                 f"the model has {tuple(shapes[name])}",
                                 "Use a delta trained on this SD1.5 architecture")
    log = TrainingLog.from_json(meta["training_log"]) if "training_log" in meta else None
    return TrainedDelta(delta, meta), log, extra


def trainer_state(delta: TrainedDelta, extra: Mapping[str, Tensor], names: list[str]) -> dict[str, Any]:
    """A stopped run's file contents -> ``RegularizedTrainer.load_state_dict`` input."""
    tensors = {**{DELTA_PREFIX + n: t for n, t in delta.tensors.items()}, **extra}
    return unflatten_trainer_state(tensors, delta.meta, names)
