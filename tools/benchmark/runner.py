"""The benchmark's jobs: plan, resume, run in-process, and the outputs (results.csv, summary.md, plot).

Every finished job is one JSON file in ``OUT/jobs/`` written atomically (temporary file +
``os.replace``), by the driver as each result arrives; a re-run reads those back and runs only
the rest, so killing the runner loses at most the jobs in flight.  A job that failed every try
leaves ``<key>.failed.json`` (its error), is listed in ``summary.md`` and is tried again by the
next run.  ``results.csv``, ``summary.md`` and ``lambda_plot.png`` are rebuilt from the job
files after every run, also atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lipschitz_personalize.trainer.render import plot as charts

from .job import Job, Settings, jobs_dir, run_job, write_json

COLUMNS = ("subject", "lambda", "dino", "clip_i", "clip_t", "drift_fd", "drift_kid", "drift_cos",
           "drift_fid_inception", "train_seconds", "sample_seconds", "steps", "images", "drift_images", "attempt",
           "class", "device", "clip_encoder", "dino_encoder")
METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("drift_fd", "drift FD"),
           ("drift_kid", "drift KID"), ("drift_cos", "drift cos"))
PAPER = {"lambda": 500, "dino": 0.6394, "clip_i": 0.7948, "clip_t": 0.2976}
"""The paper's DreamBooth-benchmark row (SD1.5, lambda 500; drift is reported there as Inception FID)."""
# What a run may not change for OUT's existing results to stay comparable.
RESULT_FIELDS = ("model", "config", "data", "clip", "dino", "steps", "lr", "seed", "resolution", "prompts",
                 "images_per_prompt", "sample_steps", "cfg", "drift_classes", "drift_images", "drift_prompts")

Runner = Callable[[Settings, Sequence[Job], Callable[[Job, dict], None], Callable[[Job, str, int], None]], None]
"""``(settings, jobs, on_result, on_failure)``: runs the jobs, reporting each outcome as it comes."""


class SettingsChanged(ValueError):
    """OUT holds results made with other settings."""


def result_path(settings: Settings, job: Job) -> Path:
    return jobs_dir(settings.out) / f"{job.key}.json"


def failure_path(settings: Settings, job: Job) -> Path:
    return jobs_dir(settings.out) / f"{job.key}.failed.json"


def plan(subjects: Sequence[str], lambdas: Sequence[float]) -> list[Job]:
    return [Job(s, float(lam)) for s in subjects for lam in lambdas]


def check_settings(settings: Settings) -> None:
    """Refuse to mix results of different protocols in one OUT; record the settings otherwise."""
    path = Path(settings.out) / "settings.json"
    new = asdict(settings)
    if path.exists():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in RESULT_FIELDS if old.get(k) != new[k]]
        if changed:
            raise SettingsChanged(f"--out {settings.out} holds results made with other settings ({'; '.join(changed)}): "
                                  "use another --out, or the same settings to resume")
    write_json(path, new)


def finished(settings: Settings, jobs: Sequence[Job]) -> dict[Job, dict]:
    """Rows of the jobs already done (their result files), read back instead of re-run."""
    return {job: json.loads(result_path(settings, job).read_text()) for job in jobs
            if result_path(settings, job).is_file()}


def record_result(settings: Settings, job: Job, row: dict) -> None:
    write_json(result_path(settings, job), row)
    failure_path(settings, job).unlink(missing_ok=True)
    (jobs_dir(settings.out) / f"{job.key}.running").unlink(missing_ok=True)


def record_failure(settings: Settings, job: Job, error: str, tries: int) -> None:
    write_json(failure_path(settings, job), {"subject": job.subject, "lambda": job.lam, "tries": tries, "error": error})
    (jobs_dir(settings.out) / f"{job.key}.running").unlink(missing_ok=True)


def run_in_process(settings: Settings, jobs: Sequence[Job], on_result, on_failure) -> None:
    """One job after another in this process (no Ray), a bar per job's training steps; a job
    that raises is tried again up to twice, as a Ray task is."""
    def step_bar(desc: str, total: int):
        return tqdm(total=total, desc=desc, position=1, leave=False, dynamic_ncols=True)

    for job in jobs:
        for attempt in range(1, 4):
            try:
                row = run_job(settings, job, step_bar)
            except Exception:  # noqa: BLE001 - recorded and reported, never dropped
                error = traceback.format_exc()
                if attempt == 3:
                    on_failure(job, error, attempt)
                continue
            on_result(job, row)
            break


def run(settings: Settings, jobs: Sequence[Job], runner: Runner = run_in_process) -> dict[str, Any]:
    """Run the jobs not finished yet with ``runner``, then rebuild the outputs.  Returns what
    happened: ``{"ran": [...], "reused": [...], "failed": [...]}`` (job keys)."""
    check_settings(settings)
    done = finished(settings, jobs)
    todo = [j for j in jobs if j not in done]
    report: dict[str, Any] = {"reused": [j.key for j in done], "ran": [], "failed": []}
    bar = tqdm(total=len(jobs), initial=len(done), desc="benchmark jobs", position=0, dynamic_ncols=True)

    def on_result(job: Job, row: dict) -> None:
        record_result(settings, job, row)
        report["ran"].append(job.key)
        bar.update(1)

    def on_failure(job: Job, error: str, tries: int) -> None:
        record_failure(settings, job, error, tries)
        report["failed"].append(job.key)
        bar.update(1)
        tqdm.write(f"job {job.key} failed after {tries} tries: {error.strip().splitlines()[-1]}")

    try:
        if todo:
            runner(settings, todo, on_result, on_failure)
    finally:
        bar.close()
        write_outputs(settings, jobs)
    return report


# -- outputs ------------------------------------------------------------------------------
def write_outputs(settings: Settings, jobs: Sequence[Job]) -> None:
    out = Path(settings.out)
    rows = list(finished(settings, jobs).values())
    failures = [json.loads(failure_path(settings, j).read_text()) for j in jobs if failure_path(settings, j).is_file()]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(out / "results.csv", buf.getvalue())
    _write_text(out / "summary.md", summary(settings, rows, failures, len(jobs)))
    if rows:
        plot(rows).save(_tmp(out / "lambda_plot.png"), format="PNG")
        os.replace(_tmp(out / "lambda_plot.png"), out / "lambda_plot.png")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _tmp(path).write_text(text)
    os.replace(_tmp(path), path)


def means(rows: Sequence[dict]) -> dict[float, dict[str, float]]:
    """Per lambda: the mean of each metric and of the training time, and the row count."""
    out: dict[float, dict[str, float]] = {}
    for lam in sorted({float(r["lambda"]) for r in rows}):
        group = [r for r in rows if float(r["lambda"]) == lam]
        out[lam] = {k: sum(float(r[k]) for r in group) / len(group) for k, _ in METRICS + (("train_seconds", ""),)}
        out[lam]["n"] = len(group)
    return out


def summary(settings: Settings, rows: Sequence[dict], failures: Sequence[dict], planned: int) -> str:
    header = "| lambda | subjects | " + " | ".join(label for _, label in METRICS) + " | train s / job |"
    lines = [f"# DreamBooth benchmark: {len(rows)} of {planned} jobs done", "",
             f"Model `{settings.model}`; {settings.steps} training steps, lr {settings.lr:g}, seed {settings.seed}, "
             f"{settings.resolution} px; {settings.prompts} prompts x {settings.images_per_prompt} images per subject, "
             f"{settings.sample_steps} DDIM steps, CFG {settings.cfg:g}; drift: {settings.drift_classes} ImageNet "
             f"class prompts x {settings.drift_images} images, base vs personalized with the same noise, scored on "
             "CLIP image features (Frechet distance, KID, mean paired cosine).", "",
             f"Encoders: CLIP `{rows[0]['clip_encoder'] if rows else settings.clip}`, "
             f"DINO `{rows[0]['dino_encoder'] if rows else settings.dino}`.", "",
             "Means per lambda (ours) and the paper's row (SD1.5, lambda 500, 30 subjects; its drift is Inception "
             "FID, not comparable with these columns):", "", header,
             "| --- " * (len(METRICS) + 3) + "|"]
    for lam, m in means(rows).items():
        lines.append(f"| {lam:g} | {int(m['n'])} | " + " | ".join(f"{m[k]:.4f}" for k, _ in METRICS)
                     + f" | {m['train_seconds']:.1f} |")
    lines.append(f"| paper, {PAPER['lambda']} | 30 | " + " | ".join(
        f"{PAPER[k]:.4f}" if k in PAPER else "-" for k, _ in METRICS) + " | - |")
    lines += ["", "Plot of each metric against lambda: `lambda_plot.png`; one row per job: `results.csv`.", ""]
    if failures:
        lines += [f"## Failed jobs ({len(failures)}): retried, then given up; re-run to try them again", ""]
        lines += [f"- {f['subject']}, lambda {f['lambda']:g}, {f['tries']} tries: "
                  f"`{f['error'].strip().splitlines()[-1]}`" for f in failures]
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[dict]):
    """One panel per metric: its mean over subjects against lambda (a PIL image), with the
    paper's value at lambda 500 as a dot where it reports one."""
    m = means(rows)
    lams = list(m)
    panels = [(f"{label} (mean over subjects) vs lambda",
               [("ours", lams, [m[lam][k] for lam in lams])]
               + ([("paper", [PAPER["lambda"]], [PAPER[k]])] if k in PAPER else []))
              for k, label in METRICS if all(math.isfinite(m[lam][k]) for lam in lams)]
    return charts.report(panels, panel_height=180)
