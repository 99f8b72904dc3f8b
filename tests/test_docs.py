"""The measured tables in README.md, docs/performance.md and docs/toy.md are the JSON the runs wrote."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import render_docs  # noqa: E402


def test_the_docs_agree_with_the_recorded_measurements():
    stale = [doc.name for doc in render_docs.DOCS if render_docs.render(doc.read_text()) != doc.read_text()]
    assert not stale, f"{stale}: run python tools/render_docs.py (or the bench) to regenerate the tables"


def test_every_block_is_present_and_filled():
    names = {doc.name: {m.group("name") for m in render_docs.BLOCK.finditer(doc.read_text())}
             for doc in render_docs.DOCS}
    assert names == {"README.md": {"perf-summary", "toy-table", "vram-modes"},
                     "performance.md": {"perf-summary", "perf-options", "perf-fullsize", "perf-peaks", "perf-gpu"},
                     "toy.md": {"toy-table", "toy-per-seed", "toy-comparison"},
                     "lora.md": {"lora-table", "lora-fullsize"}}
    for doc in render_docs.DOCS:
        for m in render_docs.BLOCK.finditer(doc.read_text()):
            assert m.group("body").count("\n|") >= 3, f"{doc.name}:{m.group('name')} is empty"


def test_a_hand_edited_number_is_detected():
    readme = (REPO_ROOT / "README.md").read_text()
    figures = json.loads(render_docs.BENCH.read_text())["figures"]
    value = render_docs._fmt(figures["reg_overhead"]["value"])
    edited = readme.replace(f"| {value} |", "| 0.500 |", 1)
    assert edited != readme, "the README does not show the recorded reg_overhead"
    assert render_docs.render(edited) == readme


def test_every_recorded_figure_names_the_run_that_measured_it():
    figures = json.loads(render_docs.BENCH.read_text())["figures"]
    assert set(render_docs.HEADLINE) - {"ref_memory_step_in_backward"} <= set(figures)
    for name, f in figures.items():
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", f["date"]), name
        assert f["command"].startswith("python tools/bench.py"), name

