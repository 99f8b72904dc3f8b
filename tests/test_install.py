"""The pack installed the way users install it, and what the Comfy Registry would receive.

* ComfyUI-Manager's ``cm-cli install <repository URL>`` into a fresh copy of the ComfyUI tree
  (never the shared ``.comfyui`` one), offline: the repository's HEAD commit as a local bare repo
  under ``GITHUB_ENDPOINT=file://...`` laid out as ``<owner>/<repo>.git``, pip held to
  ``constraints.txt`` by ``PIP_CONSTRAINT``. Then a real server started on that tree trains and
  lists our workflows in the template browser. The Manager exits 0 even when an install failed,
  so the files, the pip state and the server are what is checked.
* ``comfy node validate`` and ``comfy node pack`` (comfy-cli) on a clone of the same commit: the
  archive holds exactly the files a user's ComfyUI needs (``.comfyignore``).
* The fields the Registry requires, the icon, the publishing workflow and the Manager list entry.

Only committed files take part (a clone of HEAD): commit before running this module.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from PIL import Image

from tools.graphs import CKPT, install_subject, personalize_graph
from tools.comfy_server import ComfyServer
from tools.setup_comfyui import comfyui_root

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
REPOSITORY = PYPROJECT["project"]["urls"]["Repository"]
OWNER, REPO = urllib.parse.urlsplit(REPOSITORY).path.strip("/").split("/")
MANAGER_ENTRY = json.loads((REPO_ROOT / "docs" / "custom-node-list.json").read_text())
BIN = Path(sys.executable).parent
# What a user's ComfyUI loads from the pack; everything else stays out of the Registry archive.
RUNTIME_DIRS = ("nodes/", "trainer/", "web/", "workflows/")
RUNTIME_FILES = {"__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE"}
# Packages the Manager never installs from requirements.txt (ComfyUI brings its own build).
MANAGER_SKIPS = {"torch", "torchvision", "torchaudio", "torchsde"}

pytestmark = pytest.mark.skipif(not (REPO_ROOT / ".git").exists() or shutil.which("git") is None,
                                reason="needs the git repository and git (the install clones HEAD)")


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> str:
    """Run ``cmd``; its combined output, or a failure that shows it."""
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}:\n{out[-6000:]}"
    return out


def _git(*args: str, cwd: Path = REPO_ROOT) -> str:
    return _run(["git", *args], cwd=cwd)


def _pip_freeze() -> list[str]:
    return _run([sys.executable, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"]).splitlines()


def _tracked(cwd: Path) -> set[str]:
    return set(_git("ls-files", cwd=cwd).splitlines())


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    """A local stand-in for GitHub: ``<dir>/<owner>/<repo>.git``, a bare clone of HEAD."""
    root = tmp_path_factory.mktemp("github")
    _git("clone", "-q", "--bare", "--depth", "1", f"file://{REPO_ROOT}", str(root / OWNER / f"{REPO}.git"))
    return root


@pytest.fixture(scope="module")
def checkout(remote, tmp_path_factory) -> Path:
    """A working clone of that commit (comfy-cli reads pyproject.toml and git ls-files there)."""
    dest = tmp_path_factory.mktemp("checkout") / REPO
    _git("clone", "-q", str(remote / OWNER / f"{REPO}.git"), str(dest))
    return dest


@dataclass
class Install:
    tree: Path          # the fresh ComfyUI tree
    pack: Path          # where the Manager put the pack
    log: str            # cm-cli's output
    freeze_before: list[str]
    freeze_after: list[str]


@pytest.fixture(scope="module")
def installed(remote, tmp_path_factory) -> Install:
    """``cm-cli install <the Manager entry's URL>`` into a copy of the ComfyUI tree."""
    tree = tmp_path_factory.mktemp("fresh") / "ComfyUI"
    shutil.copytree(comfyui_root(), tree, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "user", "input", "output", "temp"))
    before = _pip_freeze()
    log = _run([str(BIN / "cm-cli"), "install", MANAGER_ENTRY["reference"]], cwd=tree, env={
        "COMFYUI_PATH": str(tree), "GITHUB_ENDPOINT": f"file://{remote}",
        "PIP_CONSTRAINT": str(REPO_ROOT / "constraints.txt"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return Install(tree, tree / "custom_nodes" / REPO, log, before, _pip_freeze())


def _requirement_lines() -> list[str]:
    lines = [ln.strip() for ln in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


# -- ComfyUI-Manager ----------------------------------------------------------------------------


def test_requirements_txt_is_one_plain_requirement_per_line_as_the_manager_needs():
    """The Manager passes each line to ``pip install`` on its own: an option line (-r, -c, -e,
    --index-url) breaks it, and torch and friends are skipped (ComfyUI brings its own build)."""
    lines = _requirement_lines()
    assert lines
    for line in lines:
        assert not line.startswith("-"), f"requirements.txt: {line!r} is an option, not a requirement"
        req = Requirement(line)
        assert not req.url, f"requirements.txt: {line!r} installs from a URL"
        assert req.name.lower() not in MANAGER_SKIPS, f"requirements.txt: the Manager skips {req.name}"
    # The Registry reads pyproject's list: the same requirements.
    assert sorted(PYPROJECT["project"]["dependencies"]) == sorted(lines)


def test_the_manager_installs_the_committed_pack_from_its_repository_url(installed):
    assert "[INSTALLED]" in installed.log, installed.log[-4000:]
    assert installed.pack.is_dir(), f"nothing cloned into {installed.pack}:\n{installed.log[-4000:]}"
    # Every file of the commit, and the clone's HEAD is that commit.
    assert _git("rev-parse", "HEAD", cwd=installed.pack).strip() == _git("rev-parse", "HEAD").strip()
    head_files = set(_git("ls-tree", "-r", "--name-only", "HEAD").splitlines())
    assert {str(p.relative_to(installed.pack)) for p in installed.pack.rglob("*")
            if p.is_file() and ".git" not in p.relative_to(installed.pack).parts} == head_files
    # One pip install per requirements line, none of which changed the environment.
    for line in _requirement_lines():
        assert f"'install', '{line}'" in installed.log, f"the Manager did not pip install {line!r}"
    assert installed.freeze_after == installed.freeze_before


def test_a_server_on_the_installed_tree_trains_and_lists_the_workflows(installed, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(installed.tree))
    server = ComfyServer(installed.tree, link_pack=False)
    (server.checkpoints_dir / CKPT).symlink_to(tiny_ckpt)
    install_subject(server.input_dir)
    with server:
        assert server.root == installed.tree
        # ComfyUI's "Import times for custom nodes" line of the pack, without "(IMPORT FAILED)".
        loaded = [ln for ln in server.log_tail(200_000).splitlines() if ln.endswith(f"custom_nodes/{REPO}")]
        assert loaded and "IMPORT FAILED" not in loaded[0], server.log_tail()
        graph = personalize_graph("installed", steps=2)
        graph["save"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1],
                                                                         "filename_prefix": "installed"}}
        result = server.client.run(graph, timeout=600)
        assert result.status == "success", (result.error, server.log_tail())
        assert [e["step"] for e in result.events("lipschitz.progress")] == [1, 2]
        assert (installed.tree / "models" / result.outputs["save"]["text"][0]).is_file()
        listed = server.client.get("/workflow_templates")
        shipped = sorted(p.stem for p in (REPO_ROOT / "workflows").glob("*.json"))
        assert sorted(listed.get(REPO, [])) == shipped, listed
        assert "nodes" in server.client.get(f"/api/workflow_templates/{REPO}/{shipped[0]}.json")


# -- Comfy Registry -----------------------------------------------------------------------------


def test_the_registry_fields_are_filled_and_well_formed():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    # name: the node id, fixed at the first publish (letters, digits, - _ . ; no double specials).
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", REPOSITORY)
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"]


def test_the_icon_is_a_square_png_of_the_repository_at_most_400_px():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    raw = f"https://raw.githubusercontent.com/{OWNER}/{REPO}/main/"
    assert icon.startswith(raw), icon
    path = icon[len(raw):]
    assert path in _tracked(REPO_ROOT), f"{path} is not committed"
    with Image.open(REPO_ROOT / path) as im:
        assert im.format == "PNG" and im.width == im.height <= 400, (im.format, im.size)


def test_comfy_node_validate_passes(checkout, tmp_path):
    out = _run([str(BIN / "comfy"), "--skip-prompt", "--no-json", "node", "validate"], cwd=checkout,
               env={"HOME": str(tmp_path), "DO_NOT_TRACK": "1", "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert "All validation checks passed" in out and "Security warnings" not in out, out


def test_the_registry_archive_holds_only_what_comfyui_loads(checkout, tmp_path):
    _run([str(BIN / "comfy"), "--skip-prompt", "--no-json", "node", "pack"], cwd=checkout,
         env={"HOME": str(tmp_path), "DO_NOT_TRACK": "1"})
    with zipfile.ZipFile(checkout / "node.zip") as zf:
        archived = set(zf.namelist())
    expected = {f for f in _tracked(checkout) if f in RUNTIME_FILES or f.startswith(RUNTIME_DIRS)}
    assert archived == expected, {"extra": sorted(archived - expected), "missing": sorted(expected - archived)}
    assert not {f for f in archived if f.startswith(("tests/", "docs/", "tools/", ".github/", ".ci/"))}


def test_the_publish_workflow_runs_on_a_version_bump_with_the_token_secret():
    wf = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "publish.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the bare key `on` as True
    assert "workflow_dispatch" in on
    assert on["push"]["branches"] == ["main"] and on["push"]["paths"] == ["pyproject.toml"]
    (job,) = wf["jobs"].values()
    assert OWNER in job["if"] and "repository_owner" in job["if"]
    publish = [s for s in job["steps"] if s.get("uses", "").startswith("Comfy-Org/publish-node-action@")]
    assert len(publish) == 1
    assert publish[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"


def test_the_manager_list_entry_is_ready_to_submit(comfy_in_process):
    import comfyui_manager  # imports comfy

    shipped = json.loads((Path(comfyui_manager.__file__).parent / "custom-node-list.json").read_text())["custom_nodes"]
    known_keys = {k for entry in shipped for k in entry}
    assert set(MANAGER_ENTRY) <= known_keys, set(MANAGER_ENTRY) - known_keys
    assert MANAGER_ENTRY["reference"] == REPOSITORY and MANAGER_ENTRY["files"] == [REPOSITORY]
    assert MANAGER_ENTRY["install_type"] == "git-clone" and MANAGER_ENTRY["id"] == PYPROJECT["project"]["name"]
    assert MANAGER_ENTRY["title"] and MANAGER_ENTRY["author"] and MANAGER_ENTRY["description"]
    # Not yet listed under this id or URL (the list the pinned Manager ships).
    assert MANAGER_ENTRY["id"] not in {e.get("id") for e in shipped}
    assert REPOSITORY not in {e.get("reference") for e in shipped}
