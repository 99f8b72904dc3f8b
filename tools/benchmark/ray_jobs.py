"""Scale-out on Ray (optional): one task per (subject, lambda), one GPU each where there are GPUs.

``ray.init`` starts a local Ray when no address is given (CPUs only here: ``num_cpus`` of this
machine, no dashboard, quiet logs) or joins an existing cluster (``--ray-address
ray://head:10001`` or ``auto``), shipping this checkout's code to its workers (Ray's
``working_dir``); the model, photos and encoders must be at the same paths on every node.  Each task is retried by Ray itself: ``max_retries=2`` for a
worker that dies (killed, out of memory, node lost) and ``retry_exceptions=True`` for a job that
raises, so a job runs at most three times; after that the driver records it as failed (it is
reported in ``summary.md`` and re-tried by the next run, never dropped).  The driver writes each
result as it arrives, so killing it and running the same command again resumes.
"""
from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .job import Job, Settings, run_job

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_RETRIES = 2
SHIPPED_EXCLUDES = (".venv/", ".comfyui/", "output/", ".git/", "docs/", "web/", "workflows/", "*.safetensors")
MISSING = ("--ray needs the optional package ray (pip install -c constraints.txt ray==2.60.0); "
           "without --ray the benchmark runs in this process")


def require_ray():
    try:
        import ray
    except ImportError:
        raise SystemExit(MISSING) from None
    return ray


def _task(settings: Settings, job: Job) -> dict[str, Any]:
    """The job in a Ray worker, its training steps on a Ray progress bar."""
    import torch
    from ray.experimental.tqdm_ray import tqdm

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("BENCHMARK_CPUS_PER_JOB", "1"))))
    return run_job(settings, job, lambda desc, total: tqdm(total=total, desc=desc))


def run_on_ray(settings: Settings, jobs: Sequence[Job], on_result, on_failure, *, address: str | None = None,
               num_cpus: int | None = None, cpus_per_job: int = 1) -> None:
    """Run ``jobs`` as Ray tasks; report each outcome as it arrives (:data:`runner.Runner`)."""
    ray = require_ray()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "BENCHMARK_CPUS_PER_JOB": str(cpus_per_job)}
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:  # local: the workers import this checkout in place
            options = dict(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                           runtime_env={"env_vars": env})
        else:  # a cluster: Ray ships this checkout (code only) to every worker
            options = dict(runtime_env={"env_vars": {k: v for k, v in env.items() if k != "PYTHONPATH"},
                                        "working_dir": str(REPO_ROOT), "excludes": list(SHIPPED_EXCLUDES)})
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **options)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        remote = ray.remote(_task).options(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else cpus_per_job,
                                           max_retries=MAX_RETRIES, retry_exceptions=True)
        pending = {remote.remote(settings, job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except Exception:  # noqa: BLE001 - Ray gave up after its retries: recorded, reported
                on_failure(job, traceback.format_exc(), MAX_RETRIES + 1)
            else:
                on_result(job, row)
    finally:
        if started_here:
            ray.shutdown()
