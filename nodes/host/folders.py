"""``models/lipschitz_deltas``: where delta files live, and their names.

* ``auto_<key>.safetensors`` - a finished personalization, keyed by
  :func:`.delta_file.run_key`, loaded instead of retraining;
* ``partial_<key>.safetensors`` - a run stopped early, with its resume state;
* whatever ``LipschitzSaveDelta`` writes (``<prefix>_NNNNN.safetensors``).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import folder_paths

FOLDER = "lipschitz_deltas"
STALE_TMP_SECONDS = 600


def delta_dir() -> Path:
    """``models/lipschitz_deltas`` registered with ComfyUI (safetensors only).

    On first use in a process, temporary files that a killed writer left behind (never
    loadable, as large as the file being written: up to 10 GB for a stopped SD1.5 run) are
    removed once they are clearly abandoned.
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


def auto_path(key: str) -> Path:
    return delta_dir() / f"auto_{key}.safetensors"


def partial_path(key: str) -> Path:
    return delta_dir() / f"partial_{key}.safetensors"


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
