"""The layout the README describes, enforced on the import graph.

* ``trainer/`` is pure PyTorch: it imports neither ComfyUI nor the node layer.
* One module joins the two sides (``nodes/host/run.py``, the seam); every other module imports
  ComfyUI or ``trainer``, not both.
* ``nodes/*.py`` hold node classes only; their machinery lives in ``nodes/host/``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution",
                 "node_helpers", "latent_preview", "nodes"}
SEAM = "nodes/host/run.py"


def _package_files() -> list[Path]:
    return [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "trainer").rglob("*.py")),
            *sorted((REPO_ROOT / "nodes").rglob("*.py"))]


def _imports(path: Path) -> set[str]:
    """Absolute dotted names imported by ``path``, relative imports resolved inside the pack
    (the pack's root package is written ``pack``)."""
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = ["pack", *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        package = parts
    else:
        package = parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                out.update([name] if node.module else [f"{name}.{a.name}" for a in node.names])
            else:
                out.add(node.module or "")
    return out


def _kinds(path: Path) -> tuple[bool, bool]:
    """(imports ComfyUI, imports trainer) directly."""
    names = _imports(path)
    comfy = any(n.split(".")[0] in COMFY_MODULES for n in names)
    trainer = any(n == "pack.trainer" or n.startswith("pack.trainer.") or n.split(".")[0] == "trainer" for n in names)
    return comfy, trainer


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def test_the_import_resolver_sees_both_sides_of_the_seam():
    comfy, trainer = _kinds(REPO_ROOT / SEAM)
    assert comfy and trainer
    assert _kinds(REPO_ROOT / "nodes/host/model.py") == (True, False)
    assert _kinds(REPO_ROOT / "nodes/host/delta_file.py") == (False, True)
    assert _kinds(REPO_ROOT / "nodes/grid.py") == (True, False)


def test_only_the_seam_imports_both_comfyui_and_the_trainer():
    both = [_rel(p) for p in _package_files() if all(_kinds(p))]
    assert both == [SEAM]


def test_the_trainer_imports_no_host():
    for path in (REPO_ROOT / "trainer").rglob("*.py"):
        names = _imports(path)
        hosts = [n for n in names if n.split(".")[0] in COMFY_MODULES | {"diffusers"} or n.startswith("pack.nodes")]
        assert not hosts, f"{_rel(path)} imports {hosts}"


def test_importing_the_trainer_loads_no_comfyui():
    code = ("import sys, trainer.loop, trainer.job, trainer.toy, trainer.persist; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(COMFY_MODULES)!r}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_node_files_hold_node_classes_only():
    for path in sorted((REPO_ROOT / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text())
        functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert not functions, f"{_rel(path)} defines functions {functions}: move them to nodes/host/"
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            bases = [ast.unparse(b) for b in cls.bases]
            assert bases == ["io.ComfyNode"], f"{_rel(path)}: {cls.name} is not a node class ({bases})"
