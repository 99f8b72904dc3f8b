"""Run a :class:`~trainer.loop.RegularizedTrainer` to its end in the caller's thread.

A host calls :func:`run` from the thread it already works in (ComfyUI's worker thread, the
benchmark's job): ``on_step`` gets each step's :class:`~trainer.metrics.StepMetrics` (with speed
and ETA), ``stop()`` is asked before every step, and the result says how the run ended.

Why not a thread of our own: on a CPU each thread that runs torch ops gets its own OpenMP team,
and with more OpenMP threads alive than cores libgomp cuts its spin-wait, so every parallel
region pays a futex wake-up.  A training step in a second thread measured 1.2-1.3x the same step
in the thread that already owns a team (2 cores, docs/performance.md, ``node_overhead``).

The delta is only ever written by a completed optimizer step, so whatever ends the run -
a stop, a non-finite loss, an exception in the forward or in ``on_step`` - leaves a consistent
delta whose step count is ``trainer.step_count``.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal

import torch

from .loop import RegularizedTrainer
from .metrics import StepMetrics
from .objective import NonFiniteLossError
from .precision import tf32_as_configured

Status = Literal["completed", "cancelled", "diverged"]
THREAD_NAME = "lipschitz-train"
"""The OS name of the thread while it trains (``top -H``, ``py-spy``, ``/proc/<pid>/task/*/comm``)."""


@dataclass
class JobResult:
    status: Status
    steps_done: int
    message: str = ""


def run(trainer: RegularizedTrainer, on_step: Callable[[StepMetrics], None],
        stop: Callable[[], bool] = lambda: False) -> JobResult:
    """Train until ``trainer.config.steps``, a ``stop()`` before a step (``cancelled``) or a
    non-finite loss (``diverged``); any other error propagates with its traceback."""
    total = trainer.config.steps
    first, started = trainer.step_count, time.perf_counter()
    # Grad mode is thread-local: ComfyUI runs nodes under inference_mode, which must not leak
    # into (or be changed for) anything but this loop.  TF32 is the config's choice, not the
    # process's (trainer/precision.py).
    with _os_thread_named(THREAD_NAME), torch.inference_mode(False), torch.enable_grad(), \
            tf32_as_configured(trainer.config.tf32), trainer.running():
        try:
            while trainer.step_count < total:
                if stop():
                    return JobResult("cancelled", trainer.step_count, "cancelled by the user")
                metrics = trainer.step()
                rate = (trainer.step_count - first) / max(time.perf_counter() - started, 1e-9)
                on_step(replace(metrics, steps_per_s=rate, eta_s=(total - trainer.step_count) / rate))
        except NonFiniteLossError as exc:
            return JobResult("diverged", trainer.step_count, str(exc))
    return JobResult("completed", trainer.step_count)


def _name_os_thread(name: str) -> str | None:
    """Give the calling thread ``name`` in the OS too: Python before 3.14 names threads for
    Python only.  Returns the name it had (``None`` where it cannot be read).  Linux only;
    best effort."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        old = ctypes.create_string_buffer(16)
        libc.prctl(16, old, 0, 0, 0)  # PR_GET_NAME
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        return old.value.decode(errors="replace")
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _os_thread_named(name: str) -> Iterator[None]:
    """The calling thread carries ``name`` in the OS while the block runs, then its own again:
    the host's thread shows that it is training."""
    old = _name_os_thread(name)
    try:
        yield
    finally:
        if old is not None:
            _name_os_thread(old)
