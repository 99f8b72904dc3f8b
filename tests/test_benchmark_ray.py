"""The benchmark on a local Ray: a worker killed mid-job is retried and the job's row lands.

A real local Ray (one CPU, no dashboard), the tiny models of ``tests/test_benchmark.py``.  The
job records its worker's pid and training step in ``OUT/jobs/<key>.running``; once it has
trained a step the test kills that process (SIGKILL, as the OOM killer or a lost node would)
and checks that Ray ran the job again and the driver wrote its row.  Ray is shut down afterwards and leaves no process behind.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray", reason="ray is a test dependency (requirements-dev.txt)")

from test_benchmark import _rows, benchmark_data, settings, tiny_benchmark_models  # noqa: E402,F401 - shared fixtures
from tools.benchmark import runner  # noqa: E402
from tools.benchmark.ray_jobs import run_on_ray  # noqa: E402


def _ray_processes(since: float) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline", "create_time"]):
        text = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
        if p.info["create_time"] >= since and any(n in text for n in ("raylet", "gcs_server", "ray::", "default_worker")):
            found.append(p)
    return found


def test_a_worker_killed_mid_job_is_retried_and_its_row_lands(settings):
    import ray

    job = runner.plan(["can"], [500])[0]
    running = Path(settings.out) / "jobs" / f"{job.key}.running"
    killed: list[int] = []
    stop = threading.Event()

    def kill_first_worker() -> None:
        """Once the job has trained a step (its worker records it), kill that worker."""
        while not stop.is_set():
            try:
                record = json.loads(running.read_text())
            except (OSError, ValueError):
                record = {}
            if record.get("step", 0) >= 1:
                os.kill(record["pid"], signal.SIGKILL)
                killed.append(record["pid"])
                return
            time.sleep(0.02)

    started = time.time()
    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    try:
        report = runner.run(settings, [job], partial(run_on_ray, num_cpus=1))
    finally:
        stop.set()
        killer.join(5)
    assert killed, "the job never started on a worker"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert report == {"reused": [], "ran": ["can__lambda500"], "failed": []}
    (row,) = _rows(settings.out)
    assert row["subject"] == "can" and float(row["lambda"]) == 500.0 and int(row["attempt"]) == 2
    assert not running.exists()
    assert not ray.is_initialized()
    deadline = time.time() + 20
    while _ray_processes(started) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(started), "Ray left processes behind"
