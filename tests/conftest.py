"""Shared fixtures: a ComfyUI tree, the tiny checkpoints and a real ComfyUI server.

The pack is imported as ``lipschitz_personalize`` (:mod:`tools.pack_import`), whatever this
checkout's folder is called.  Nothing here imports ComfyUI: a test that needs it in this process
(``comfy``, ``folder_paths``, the pack's ``nodes``) asks for ``comfy_in_process``, so the pure
maths tests run without it.  Any test that uses ``comfy_server`` is marked ``server``
automatically (``pytest -m "not server"`` skips them).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS = REPO_ROOT / "tools"
if str(REPO_ROOT) not in sys.path:  # tools.* (pyproject's pytest pythonpath does the same)
    sys.path.insert(0, str(REPO_ROOT))

from tools.comfy_server import ComfyServer  # noqa: E402
from tools.pack_import import add_to_sys_path  # noqa: E402
from tools.setup_comfyui import comfyui_root as _comfyui_root  # noqa: E402
from tools.setup_comfyui import use_comfy_in_process  # noqa: E402

add_to_sys_path()

MODELS_DIR = REPO_ROOT / ".comfyui" / "models"
SERVER_FIXTURES = {"comfy_server", "comfy_client"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


def _ensure_ckpt(name: str, arch: str) -> Path:
    path = MODELS_DIR / name
    if not path.is_file():  # normally made by `make tiny-ckpt`
        subprocess.run([sys.executable, str(TOOLS / "make_tiny_checkpoint.py"), "--out", str(path),
                        "--arch", arch], check=True)
    return path


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    return _comfyui_root()


@pytest.fixture(scope="session")
def comfy_in_process() -> Path:
    """ComfyUI importable in the test process, on the CPU (ComfyUI's root first on sys.path, so
    its top-level ``nodes`` wins; ``--cpu`` set before ``comfy.model_management`` probes CUDA).
    Returns the ComfyUI root."""
    return use_comfy_in_process(cpu=True)


@pytest.fixture(scope="session")
def tiny_ckpt(comfyui_root) -> Path:
    """Path of the tiny random-weight SD1.5 checkpoint (.comfyui/models/tiny_sd15.safetensors)."""
    return _ensure_ckpt("tiny_sd15.safetensors", "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(comfyui_root) -> Path:
    """Path of the tiny SDXL-shaped checkpoint (loads, detected as SDXL; not for sampling)."""
    return _ensure_ckpt("tiny_sdxl.safetensors", "sdxl")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, comfyui_root, tiny_ckpt):
    """A running ComfyUI (``main.py --cpu``) with this pack linked into custom_nodes and
    ``tiny_sd15.safetensors`` in models/checkpoints. ``comfy_server.client`` is a ComfyClient."""
    base = tmp_path_factory.mktemp("comfy")
    server = ComfyServer(base)
    link = server.checkpoints_dir / "tiny_sd15.safetensors"
    if not link.exists():
        link.symlink_to(tiny_ckpt)
    with server:
        yield server
    if os.environ.get("COMFY_TEST_SHOW_LOG"):
        print(server.log_tail())


@pytest.fixture
def comfy_client(comfy_server):
    return comfy_server.client
