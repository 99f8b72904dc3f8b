"""Safetensors files that are written atomically and verified on load.

A training run is half an hour of someone's GPU: a file we write is either complete or
absent (temporary file in the same folder, fsync, rename), and carries a SHA-256 of its
tensors and metadata in its metadata, so a truncated or altered file is refused instead of loaded.  No
pickle anywhere.  :func:`flatten_trainer_state` turns a trainer's resume state (deltas, Adam
moments, generator) into plain named tensors for the same format, with the moments either exact
(fp32) or compact (8 bits per value, block-wise scaled: a quarter of the size, in the memory
modes' own 8-bit format).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .compact_adam import BLOCK, Codec

CHECKSUM_KEY = "lipschitz.sha256"


class CorruptFileError(ValueError):
    """The file is not a complete safetensors file written by us, or its content changed."""


def digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over the metadata (but the checksum itself) and the tensors' names, dtypes,
    shapes and bytes, in key order: an edited ``steps_done`` is as corrupt as an edited weight."""
    h = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-dim tensor (a LoRA's alpha) cannot be viewed as bytes; same bytes otherwise
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_verified(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write ``tensors`` + ``metadata`` (+ checksum) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in metadata.items()}
    meta[CHECKSUM_KEY] = digest(tensors, meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        del tensors
        release_freed_memory()
    return path


def release_freed_memory() -> None:
    """Hand the heap memory freed by a large write back to the OS (glibc only; else nothing).

    A file is written from hundreds of tensor-sized buffers (copies, checksum bytes, the
    serialised file); glibc keeps the freed ones in its per-thread heaps, so without this a
    server's resident memory grows by a fraction of the file after each save.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's metadata without loading its tensors (raises :class:`CorruptFileError`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{Path(path).name} is not a readable safetensors file ({exc})") from exc


def load_verified(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load and check the checksum; a file without one or with a wrong one is refused."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path.name} is truncated or damaged ({exc})") from exc
    expected = meta.get(CHECKSUM_KEY)
    if expected is None:
        raise CorruptFileError(f"{path.name} has no {CHECKSUM_KEY} checksum: not written by this pack")
    if digest(tensors, meta) != expected:
        raise CorruptFileError(f"{path.name} is corrupted: its content does not match its checksum")
    return tensors, meta


# -- trainer resume state as named tensors ------------------------------------------------
MOMENT_FORMATS: tuple[str, ...] = ("fp32", "fp8")
CHUNK = 256 * BLOCK
_CODEC = Codec("fp8")


def compact_moment(t: Tensor, key: str) -> tuple[Tensor, Tensor]:
    """An Adam moment -> its 8-bit form: :class:`~trainer.compact_adam.Codec`'s fp8 blocks (the
    memory modes' format; ``exp_avg_sq`` as its square root), rounded to nearest.

    Encoded :data:`CHUNK` values at a time, so a stopped SD1.5 run is written with small, reused
    temporaries (no heap left fragmented behind it).
    """
    flat = t.detach().reshape(-1)
    stored = _CODEC.zeros(flat.numel(), "cpu")
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK].to(torch.float32, copy=True)  # encode scales its input in place
        part = torch.nn.functional.pad(part, (0, -part.numel() % BLOCK))
        _CODEC.encode(_CODEC.part(stored, start, start + part.numel()), part, root=key == "exp_avg_sq")
    return stored["value"], stored["scale"]


def expand_moment(value: Tensor, scale: Tensor, key: str, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`compact_moment`, in fp32.  A second moment stored as 0 comes back as half
    the format's smallest step, never as 0, so a resumed Adam step ``m / (sqrt(v) + eps)``
    cannot blow up where ``m`` survived and ``v`` underflowed."""
    second = key == "exp_avg_sq"
    values = _CODEC.decode({"value": value, "scale": scale}, root=second, nonzero=second)
    return values[:math.prod(shape)].reshape(shape).contiguous()


def flatten_trainer_state(state: Mapping[str, Any], names: list[str],
                          moments: str = "fp32") -> tuple[dict[str, Tensor], dict[str, str]]:
    """``RegularizedTrainer.state_dict()`` -> (tensors, metadata) for :func:`save_verified`.

    Adam's per-parameter state is keyed by the parameter's position; ``names`` (the delta's
    names in order) turns it into stable names.  ``moments="fp8"`` stores Adam's moments in
    8 bits (:func:`compact_moment`): a resumed run then continues from those rounded values.
    """
    if moments not in MOMENT_FORMATS:
        raise ValueError(f"moments must be one of {MOMENT_FORMATS}, got {moments!r}")
    tensors: dict[str, Tensor] = {f"delta.{n}": t for n, t in state["delta"].items()}
    for idx, per_param in state["optimizer"]["state"].items():
        for key, value in per_param.items():
            name = f"adam.{key}.{names[idx]}"
            if key == "step":
                tensors[name] = torch.as_tensor(value).reshape(-1)
            elif moments == "fp8":
                tensors[name], tensors[name + ".scale"] = compact_moment(value, key)
            else:
                tensors[name] = value
    tensors["generator"] = state["generator"]
    meta = {"step": str(state["step"]), "param_groups": json.dumps(state["optimizer"]["param_groups"]),
            "moments": moments}
    return tensors, meta


def unflatten_trainer_state(tensors: Mapping[str, Tensor], meta: Mapping[str, str], names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`flatten_trainer_state` (compact moments come back as fp32)."""
    if meta.get("moments", "fp32") not in MOMENT_FORMATS:
        raise ValueError(f"its Adam moments are stored as {meta['moments']!r} by an earlier version of the pack, "
                         f"which this version does not read (it reads {', '.join(MOMENT_FORMATS)})")
    deltas = {n: tensors[f"delta.{n}"] for n in names}
    opt_state: dict[int, dict[str, Tensor]] = {}
    for idx, name in enumerate(names):
        per_param = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = tensors.get(f"adam.{key}.{name}")
            if t is None:
                continue
            if key == "step":
                per_param[key] = t.reshape(())
            elif f"adam.{key}.{name}.scale" in tensors:
                per_param[key] = expand_moment(t, tensors[f"adam.{key}.{name}.scale"], key,
                                               tuple(deltas[name].shape))
            else:
                per_param[key] = t
        if per_param:
            opt_state[idx] = per_param
    return {
        "delta": deltas,
        "optimizer": {"state": opt_state, "param_groups": json.loads(meta["param_groups"])},
        "generator": tensors["generator"],
        "step": int(meta["step"]),
    }
