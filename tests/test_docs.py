"""The docs are true to the repository: the measured tables in README.md and docs/*.md are the
JSON the runs wrote, and every file, link, `make` target and `python` command they name exists."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tools import render_docs

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_agree_with_the_recorded_measurements():
    stale = [doc.name for doc in render_docs.DOCS if render_docs.render(doc.read_text()) != doc.read_text()]
    assert not stale, f"{stale}: run python tools/render_docs.py (or the bench) to regenerate the tables"


def test_every_block_is_present_and_filled():
    names = {doc.name: {m.group("name") for m in render_docs.BLOCK.finditer(doc.read_text())}
             for doc in render_docs.DOCS}
    assert names == {"README.md": {"vram-modes"},
                     "performance.md": {"perf-summary", "perf-options", "perf-fullsize", "perf-ops", "perf-peaks", "perf-gpu"},
                     "method.md": {"toy-table"},
                     "toy.md": {"toy-table", "toy-per-seed", "toy-comparison"},
                     "lora.md": {"lora-table", "lora-microworld", "lora-fullsize"},
                     "microworld.md": {"microworld-accuracy", "microworld-sweep"},
                     "preview.md": {"preview-cost"}}
    for doc in render_docs.DOCS:
        for m in render_docs.BLOCK.finditer(doc.read_text()):
            assert m.group("body").count("\n|") >= 3, f"{doc.name}:{m.group('name')} is empty"


def test_a_hand_edited_number_is_detected():
    doc = (REPO_ROOT / "docs" / "performance.md").read_text()
    figures = json.loads(render_docs.BENCH.read_text())["figures"]
    value = render_docs._fmt(figures["reg_overhead"]["value"])
    edited = doc.replace(f"| {value} |", "| 0.500 |", 1)
    assert edited != doc, "docs/performance.md does not show the recorded reg_overhead"
    assert render_docs.render(edited) == doc


def test_every_recorded_figure_names_the_run_that_measured_it():
    figures = json.loads(render_docs.BENCH.read_text())["figures"]
    assert set(render_docs.HEADLINE) - {"ref_memory_step_in_backward"} <= set(figures)
    for name, f in figures.items():
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", f["date"]), name
        assert f["command"].startswith("python tools/bench.py"), name



# -- every file, link, make target and command the docs name exists ----------------------------

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# What a user's checkout has at its top level (not the venv, ComfyUI or outputs the Makefile makes).
TOP_LEVEL = {p.name for p in REPO_ROOT.iterdir()} - {".git", ".venv", ".comfyui", "output"}
CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAKE = re.compile(r"\bmake ([A-Za-z][\w-]*)")
PY_MODULE = re.compile(r"\bpython3? -m ([A-Za-z_][\w.]*)")


def _code_spans(text: str) -> list[str]:
    """Inline code and fenced blocks: where a doc names files and commands."""
    return [m.group(1) or m.group(2) for m in CODE.finditer(text)]


def _repository_paths(span: str) -> list[str]:
    """Tokens of ``span`` that are paths inside this repository (``tools/bench.py``,
    ``docs/gpu/probes_*.jsonl``): their first component is a top-level entry of the checkout."""
    paths = []
    for token in span.split():
        token = token.strip("\"'(),;:.?!").split("=", 1)[-1].split("#", 1)[0]
        if "/" in token and token.split("/", 1)[0] in TOP_LEVEL and not any(c in token for c in "<>{}$"):
            paths.append(token.rstrip("/"))
    return paths


def _exists(path: str) -> bool:
    return any(REPO_ROOT.glob(path)) if "*" in path else (REPO_ROOT / path).exists()


def _make_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", (REPO_ROOT / "Makefile").read_text(), re.M)}


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _missing(doc: Path) -> list[str]:
    """What ``doc`` names that the repository lacks, one line each."""
    text, missing = doc.read_text(), []
    targets = _make_targets()
    for span in _code_spans(text):
        missing += [f"file {p}" for p in _repository_paths(span) if not _exists(p)]
        missing += [f"make target {t}" for t in MAKE.findall(span) if t not in targets]
        for module in PY_MODULE.findall(span):
            if module.split(".")[0] not in TOP_LEVEL:  # pytest, pip: not the repository's
                continue
            base = REPO_ROOT / module.replace(".", "/")
            if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
                missing.append(f"python module {module}")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (doc.parent / path).resolve() if path else doc
        if not where.exists():
            missing.append(f"link {target}")
        elif anchor and where.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", where.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                missing.append(f"link {target} (no such heading)")
    return missing


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_file_target_and_command_a_doc_names_exists(doc):
    missing = _missing(doc)
    assert not missing, f"{doc.relative_to(REPO_ROOT)} names what the repository lacks: {missing}"


def test_the_name_check_finds_a_wrong_path_target_module_and_anchor(tmp_path):
    """The check above is not vacuous: the README's own names are found, and one wrong name of
    each kind is reported."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert "tools/workflow_convert.py" in {p for s in _code_spans(readme) for p in _repository_paths(s)}
    assert "docs/performance.md" in LINK.findall(readme)
    assert {"demo", "test"} <= {t for s in _code_spans(readme) for t in MAKE.findall(s)}
    wrong = tmp_path / "wrong.md"
    wrong.write_text("# Title\n\nRun `python tools/no_such_tool.py`, `make no-such-target`, "
                     "`python -m trainer.no_such_module`, see [x](wrong.md#no-heading) and `docs/gpu/none_*.jsonl`.\n")
    assert _missing(wrong) == ["file tools/no_such_tool.py", "make target no-such-target",
                               "python module trainer.no_such_module", "file docs/gpu/none_*.jsonl",
                               "link wrong.md#no-heading (no such heading)"]
