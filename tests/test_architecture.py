"""The layout the README describes, enforced on the import graph.

* ``trainer/`` is everything that needs no ComfyUI: it never imports ComfyUI (nor ``nodes/``),
  and importing it - or the pack's root package - loads no ComfyUI.
* ``nodes/*.py`` hold node classes only; their ComfyUI machinery lives in ``nodes/host/``.
* Outside ComfyUI the pack is one package, ``lipschitz_personalize`` (``tools/pack_import.py``):
  tests and tools never import ``trainer``/``nodes`` as top-level modules or load pack files by
  path, and tools never import tests.
* The pure-maths tests run without ComfyUI in the process.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tools.pack_import import NAME, subprocess_env

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution",
                 "node_helpers", "latent_preview", "nodes"}
# Test modules that must need no ComfyUI (maths and files of the trainer, the toy).
PURE_TESTS = ("test_objective", "test_toy", "test_metrics", "test_persistence", "test_architecture", "test_preview")


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


def _imports_comfy(path: Path) -> bool:
    return any(n.split(".")[0] in COMFY_MODULES for n in _imports(path))


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def _loaded_comfy(code: str, cwd: Path = REPO_ROOT) -> list[str]:
    """ComfyUI modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    code += (f"; import json, sys; print(json.dumps(sorted(m for m in sys.modules "
             f"if m.split('.')[0] in {sorted(COMFY_MODULES)!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_import_resolver_sees_comfyui_and_relative_imports():
    assert _imports_comfy(REPO_ROOT / "nodes/host/model.py")
    assert not _imports_comfy(REPO_ROOT / "trainer/files/delta_file.py")
    assert "pack.trainer.persist" in _imports(REPO_ROOT / "trainer/files/delta_file.py")
    assert "pack.trainer.config" in _imports(REPO_ROOT / "nodes/personalize.py")


def test_the_trainer_imports_no_comfyui_and_no_node_code():
    for path in (REPO_ROOT / "trainer").rglob("*.py"):
        names = _imports(path)
        hosts = [n for n in names if n.split(".")[0] in COMFY_MODULES | {"diffusers"} or n.startswith("pack.nodes")]
        assert not hosts, f"{_rel(path)} imports {hosts}"


def test_importing_the_pack_and_every_trainer_module_loads_no_comfyui():
    modules = sorted(".".join((NAME, *p.relative_to(REPO_ROOT).with_suffix("").parts)).removesuffix(".__init__")
                     for p in (REPO_ROOT / "trainer").rglob("*.py"))
    assert f"{NAME}.trainer.files.delta_file" in modules
    assert _loaded_comfy(f"import {NAME}; " + "; ".join(f"import {m}" for m in modules)) == []


def test_the_pure_maths_tests_run_without_comfyui():
    """conftest and these test modules, imported as pytest does, load no ComfyUI."""
    code = "import sys; sys.path.insert(0, 'tests'); import conftest; " + "; ".join(f"import {m}" for m in PURE_TESTS)
    assert _loaded_comfy(code) == []


def _absolute_imports(path: Path) -> set[str]:
    return {n for n in _imports(path) if not n.startswith("pack.")}


def test_tests_and_tools_import_the_pack_only_as_one_package():
    bad = {}
    for path in [*sorted((REPO_ROOT / "tests").rglob("*.py")), *sorted((REPO_ROOT / "tools").rglob("*.py"))]:
        text = path.read_text()
        found = [n for n in _absolute_imports(path) if n.split(".")[0] in {"trainer", "nodes"}]
        found += [w for w in ("spec_from_file_location", "_pack_module") if w in text and path.name != "test_architecture.py"]
        if _rel(path).startswith("tools/"):
            found += [n for n in _absolute_imports(path) if n.split(".")[0].startswith(("test_", "conftest", "tests"))]
        if found:
            bad[_rel(path)] = found
    assert not bad, bad


def test_node_files_hold_node_classes_only():
    for path in sorted((REPO_ROOT / "nodes").glob("*.py")):
        if path.name == "__init__.py":  # the registry: the node list and the extension that returns it
            continue
        tree = ast.parse(path.read_text())
        functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert not functions, f"{_rel(path)} defines functions {functions}: move them to nodes/host/"
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            bases = [ast.unparse(b) for b in cls.bases]
            assert bases == ["io.ComfyNode"], f"{_rel(path)}: {cls.name} is not a node class ({bases})"
