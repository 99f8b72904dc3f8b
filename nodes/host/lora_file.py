"""``models/loras/<prefix>_NNNNN.safetensors``: where an exported LoRA goes, checked and written.

The delta comes from the node's DELTA input or from a delta file (read without a model: the
LoRA needs only the delta's names and values); :mod:`trainer.lora` factors it and the file is
written atomically (:func:`trainer.persist.save_verified`) once the disk is known to hold it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import folder_paths
import torch

from ...trainer.lora import Progress, delta_from_file, extract_lora, kohya_metadata, lora_nbytes, LoRAStats
from ...trainer.persist import CorruptFileError, load_verified, save_verified
from ...trainer.files.delta_file import TrainedDelta
from ...trainer.errors import NodeInputError

DISK_MARGIN = 64 * 2**20  # the temporary file and the safetensors header, with room to spare


def lora_dir() -> Path:
    path = Path(folder_paths.get_folder_paths("loras")[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_delta_file(path: Path) -> TrainedDelta:
    """A delta file -> its delta and metadata; a damaged or foreign file is refused."""
    try:
        tensors, meta = load_verified(path)
        return TrainedDelta(delta_from_file(tensors), meta)
    except (CorruptFileError, ValueError) as exc:
        raise NodeInputError("delta_file", f"{path.name}: {exc}", "Pick a delta file this pack wrote") from exc


def require_disk_space(folder: Path, nbytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes + DISK_MARGIN:
        raise NodeInputError("filename_prefix", f"the LoRA needs about {nbytes / 1e6:.0f} MB, {folder} has "
                             f"{free / 1e6:.0f} MB free", "Free disk space or lower the rank")


def export_lora(delta: TrainedDelta, rank: int, path: Path, source: str, keep_1d: bool = False,
                progress: Progress | None = None) -> LoRAStats:
    """Factor ``delta`` at ``rank`` and write it to ``path`` (disk space checked first)."""
    shapes = [tuple(t.shape) for t in delta.tensors.values()]
    require_disk_space(path.parent, lora_nbytes(shapes, rank, torch.float16, keep_1d))
    tensors, stats = extract_lora(delta.tensors, rank, torch.float16, keep_1d, progress)
    meta = kohya_metadata(stats, source, delta.meta.get("base_fingerprint", "unknown"))
    save_verified(path, tensors, meta)
    return stats
