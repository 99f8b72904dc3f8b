"""The benchmark runner in-process: the protocol read from the real benchmark folder, one row per
job, resume from the finished jobs' files, failures retried then reported, never mixed settings.

Tiny random diffusers SD1.5 and encoders (written here with ``save_pretrained``), a stand-in
DreamBooth folder (the benchmark's own ``prompts_and_classes.txt`` from ``tests/data/dreambooth``,
the shipped ``tests/data/dog`` photos in every subject's folder: no dataset beside the
repository is needed), 64 px, two training steps, two prompts x one image, two sampling steps.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tools.benchmark import __main__ as cli
from tools.benchmark import protocol, runner
from tools.benchmark.job import Job, Settings, write_json

TEST_DATA = Path(__file__).resolve().parent / "data"
TINY = dict(steps=2, resolution=64, prompts=2, images_per_prompt=1, sample_steps=2, drift_classes=2, drift_images=1)


@pytest.fixture(scope="session")
def tiny_benchmark_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random diffusers SD1.5 + CLIP + DINO, as ``make benchmark-smoke`` writes them."""
    return cli.smoke_models(tmp_path_factory.mktemp("benchmark_models"))


@pytest.fixture(scope="session")
def benchmark_data(tmp_path_factory) -> Path:
    """The benchmark's layout: its index and one folder of photos per subject (links to the
    shipped dog photos)."""
    root = tmp_path_factory.mktemp("dreambooth")
    index = (TEST_DATA / "dreambooth" / protocol.INDEX).read_text()
    (root / protocol.INDEX).write_text(index)
    photos = sorted((TEST_DATA / "dog").glob("*.jpg"))
    for name in re.findall(r"^([\w-]+),", index.split("Prompts")[0], flags=re.MULTILINE):
        if name == "subject_name":  # the table's header
            continue
        (root / name).mkdir()
        for photo in photos:
            (root / name / photo.name).symlink_to(photo)
    return root


@pytest.fixture
def settings(tiny_benchmark_models, benchmark_data, tmp_path) -> Settings:
    return Settings(data=str(benchmark_data), out=str(tmp_path / "out"), **tiny_benchmark_models, **TINY)


def _rows(out: str) -> list[dict]:
    with open(Path(out) / "results.csv") as f:
        return list(csv.DictReader(f))


def test_the_protocol_is_read_from_the_benchmark_folder(benchmark_data):
    bench = protocol.read_benchmark(benchmark_data)
    assert len(bench.subjects) == 30 and len(bench.object_prompts) == len(bench.live_prompts) == 25
    dog, can = bench.subjects["dog"], bench.subjects["can"]
    assert dog.live and not can.live and bench.subjects["bear_plushie"].class_name == "stuffed animal"
    assert dog.instance_prompt == "a photo of sks dog"
    assert bench.prompts(dog)[10] == "a sks dog wearing a red hat"  # the live list
    assert bench.prompts(can)[10] == "a sks can with a wheat field in the background"  # the object list
    prompts, seeds = protocol.expand(bench.prompts(dog, 2), 2)
    assert prompts == ["a sks dog in the jungle"] * 2 + ["a sks dog in the snow"] * 2 and len(set(seeds)) == 4
    assert protocol.expand(bench.prompts(can, 2), 2)[1] == seeds  # every subject samples from the same noise
    assert protocol.drift_prompts(3) == ["a photo of a tench", "a photo of a hamster", "a photo of a mortar"]
    with pytest.raises(protocol.ProtocolError, match="--drift-prompts .*: no such file"):
        protocol.drift_prompts(3, benchmark_data / "drift.txt")
    with pytest.raises(protocol.ProtocolError, match="unknown dgo"):
        protocol.select(bench, ["dog", "dgo"])


def test_a_folder_that_is_not_the_benchmark_is_refused_before_any_work(tmp_path, benchmark_data):
    with pytest.raises(protocol.ProtocolError, match="no prompts_and_classes.txt"):
        protocol.read_benchmark(tmp_path)
    (tmp_path / "prompts_and_classes.txt").write_text((benchmark_data / "prompts_and_classes.txt").read_text())
    with pytest.raises(protocol.ProtocolError, match="no photos for backpack, backpack_dog"):
        protocol.read_benchmark(tmp_path)


def test_each_job_writes_a_row_and_a_rerun_reads_finished_jobs_back(settings):
    jobs = runner.plan(["dog"], [0, 500])
    report = runner.run(settings, jobs)
    assert report == {"reused": [], "ran": ["dog__lambda0", "dog__lambda500"], "failed": []}
    rows = _rows(settings.out)
    assert [(r["subject"], float(r["lambda"])) for r in rows] == [("dog", 0.0), ("dog", 500.0)]
    assert {"subject", "lambda", "dino", "clip_i", "clip_t", "drift_fd", "train_seconds", "steps"} <= set(rows[0])
    for r in rows:
        assert all(-1.0 <= float(r[k]) <= 1.0 for k in ("dino", "clip_i", "clip_t", "drift_cos"))
        assert float(r["drift_fd"]) >= 0 and int(r["steps"]) == 2 and float(r["train_seconds"]) > 0
    summary = (Path(settings.out) / "summary.md").read_text()
    assert "| paper, 500 | 30 | 0.6394 | 0.7948 | 0.2976 |" in summary and "2 of 2 jobs done" in summary
    assert (Path(settings.out) / "lambda_plot.png").stat().st_size > 1000

    jobs_dir = Path(settings.out) / "jobs"
    kept = jobs_dir / "dog__lambda0.json"
    stamp = kept.stat().st_mtime_ns
    (jobs_dir / "dog__lambda500.json").unlink()  # as if the runner was killed during that job
    again = runner.run(settings, jobs)
    assert again == {"reused": ["dog__lambda0"], "ran": ["dog__lambda500"], "failed": []}
    assert kept.stat().st_mtime_ns == stamp  # read back, not re-run nor re-written
    assert len(_rows(settings.out)) == 2
    assert not [p.name for p in jobs_dir.iterdir() if p.name.endswith(".tmp") or p.suffix == ".running"]


def test_a_result_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "jobs" / "dog__lambda0.json"
    write_json(path, {"dino": 0.5})

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between writing the temporary file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"dino": 0.7})
    assert json.loads(path.read_text()) == {"dino": 0.5}


def test_a_failing_job_is_tried_three_times_then_reported_not_dropped(settings):
    broken = replace(settings, model=str(Path(settings.out).parent / "no_such_model"))
    job = Job("can", 500.0)
    report = runner.run(broken, [job])
    assert report["failed"] == ["can__lambda500"] and report["ran"] == []
    failure = json.loads((Path(broken.out) / "jobs" / "can__lambda500.failed.json").read_text())
    assert failure["tries"] == 3 and "no_such_model: no such file" in failure["error"]
    summary = (Path(broken.out) / "summary.md").read_text()
    assert "## Failed jobs (1)" in summary and "- can, lambda 500, 3 tries: `" in summary
    assert _rows(broken.out) == []


def test_results_of_other_settings_are_not_mixed_in(settings):
    runner.check_settings(settings)
    with pytest.raises(runner.SettingsChanged, match=r"steps: 2 -> 3"):
        runner.check_settings(replace(settings, steps=3))


def test_the_command_line_says_what_is_missing(tmp_path, benchmark_data, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="missing --model, --clip, --dino"):
        cli.main(["--data", str(benchmark_data), "--out", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "ray", None)  # ray not installed
    with pytest.raises(SystemExit, match=r"--ray needs the optional package ray \(pip install"):
        cli.main(["--data", str(benchmark_data), "--out", str(tmp_path), "--ray", "--smoke"])


def test_plot_ticks_tell_apart_a_metric_that_moves_in_its_fourth_digit():
    from lipschitz_personalize.trainer.render import plot

    for lo, hi in ((0.30006, 0.30011), (0.9966, 0.9969), (-0.12295, -0.12277), (0.0, 1.5)):
        labels = plot._labels(plot._ticks(lo, hi))
        assert len(set(labels)) == len(labels), labels
        assert all(abs(float(s) - v) <= (hi - lo) / 4 for s, v in zip(labels, plot._ticks(lo, hi))), labels
