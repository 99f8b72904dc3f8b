"""The pack as the package ``lipschitz_personalize``, whatever its checkout's folder is called.

ComfyUI imports the pack by its folder, whose name is the user's (a clone is
``comfyui-lipschitz-personalize``; CI and worktrees use any name).  Outside ComfyUI - tests,
tools, the headless benchmark - the pack is imported as one normal package,
``lipschitz_personalize``, with relative imports inside: :func:`add_to_sys_path` puts a folder
holding the link ``lipschitz_personalize -> <this checkout>`` first on ``sys.path``.  The link
lives under the system's temp folder (one per checkout), not in the repository, so nothing that
walks the checkout meets a link back to itself.  Importing ``lipschitz_personalize.trainer``
imports no ComfyUI (the root ``__init__`` imports it only in ``comfy_entrypoint``).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

NAME = "lipschitz_personalize"
REPO_ROOT = Path(__file__).resolve().parent.parent


def link_dir() -> Path:
    """The folder holding the link to this checkout, made (or repaired) on first use."""
    folder = Path(tempfile.gettempdir()) / f"{NAME}-{hashlib.sha1(str(REPO_ROOT).encode()).hexdigest()[:12]}"
    link = folder / NAME
    if not (link.is_symlink() and link.resolve() == REPO_ROOT):
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{NAME}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(REPO_ROOT, target_is_directory=True)
        os.replace(tmp, link)  # atomic: concurrent test processes see the old link or the new one
    return folder


def add_to_sys_path() -> str:
    """Make ``import lipschitz_personalize`` find this checkout; returns the package name."""
    folder = str(link_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return NAME


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the link folder on ``PYTHONPATH``, for a child
    Python that imports the pack."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(link_dir()), env.get("PYTHONPATH", "")) if p)
    return env
