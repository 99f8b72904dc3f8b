"""``models/lipschitz_deltas``: where delta files live, and their names.

* ``auto_<key>.safetensors`` - a finished personalization, keyed by
  :func:`.delta_file.run_key`, loaded instead of retraining; together they are kept under a cap
  (``LIPSCHITZ_AUTO_CACHE_GB``, 20 GB by default) by evicting the least recently used;
* ``partial_<key>.safetensors`` - a run stopped early, with its resume state;
* whatever ``LipschitzSaveDelta`` writes (``<prefix>_NNNNN.safetensors``), never evicted.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import folder_paths

FOLDER = "lipschitz_deltas"
STALE_TMP_SECONDS = 600
AUTO_CACHE_ENV = "LIPSCHITZ_AUTO_CACHE_GB"
DEFAULT_AUTO_CACHE_GB = 20.0
log = logging.getLogger(__name__)


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


EVAL_FOLDER = "eval"


def eval_dirs() -> list[Path]:
    """Where evaluation encoders are looked for: ``models/eval`` (registered with ComfyUI, so
    ``extra_model_paths.yaml`` can add an ``eval:`` entry), then ``models/clip_vision``."""
    default = Path(folder_paths.models_dir) / EVAL_FOLDER
    folder_paths.add_model_folder_path(EVAL_FOLDER, str(default), is_default=True)
    default.mkdir(parents=True, exist_ok=True)
    return [Path(p) for name in (EVAL_FOLDER, "clip_vision") for p in folder_paths.get_folder_paths(name)]


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


def next_free(prefix: str, folder: Path | None = None) -> Path:
    """The first unused ``<prefix>_NNNNN.safetensors`` in ``folder`` (default: the delta folder)."""
    base = safe_filename(prefix)
    folder = folder or delta_dir()
    n = 1
    while (folder / f"{base}_{n:05d}.safetensors").exists():
        n += 1
    return folder / f"{base}_{n:05d}.safetensors"


def gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def auto_cache_cap() -> int:
    """Bytes the auto-saved runs may take together (``LIPSCHITZ_AUTO_CACHE_GB``)."""
    raw = os.environ.get(AUTO_CACHE_ENV, "")
    try:
        cap = float(raw) if raw.strip() else DEFAULT_AUTO_CACHE_GB
        if cap < 0:
            raise ValueError(raw)
    except ValueError:
        log.warning("%s=%r is not a number of GB >= 0; using %g", AUTO_CACHE_ENV, raw, DEFAULT_AUTO_CACHE_GB)
        cap = DEFAULT_AUTO_CACHE_GB
    return int(cap * 1e9)


def mark_used(path: Path) -> None:
    """A reloaded run counts as recently used (eviction goes by modification time)."""
    os.utime(path)


def evict_auto(keep: Path) -> list[tuple[str, int]]:
    """Delete the least recently used ``auto_*`` runs (never ``keep``) until the rest fit the
    cap; returns the (name, bytes) evicted.  Files written by Save Delta are not touched."""
    cap = auto_cache_cap()
    runs = sorted(delta_dir().glob("auto_*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in runs)
    evicted = []
    for path in runs:
        if total <= cap:
            break
        if path == keep:
            continue
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        total -= size
        evicted.append((path.name, size))
        log.info("LipschitzPersonalize: evicted %s (%s) to keep auto-saved runs under %s (%s)",
                 path.name, gb(size), gb(cap), AUTO_CACHE_ENV)
    return evicted
