"""Run a :class:`~trainer.loop.RegularizedTrainer` in a background thread or in the caller's.

In a thread, the caller (a script, a test) polls :meth:`TrainingJob.poll` for the steps'
:class:`~trainer.metrics.StepMetrics` (with speed and ETA), may :meth:`~TrainingJob.cancel`, and gets the outcome from :meth:`~TrainingJob.wait`,
which re-raises the worker's exception (with the worker's traceback) in the caller's thread.
A host that already runs in a worker thread (the ComfyUI node, the benchmark) calls
:meth:`TrainingJob.run_here`, which is faster on a CPU (see there), with callbacks instead.
The delta is only ever written by a completed optimizer step, so whatever ends the run -
cancel, a non-finite loss, an exception in the forward - leaves a consistent delta whose
step count is ``trainer.step_count``.
"""
from __future__ import annotations

import contextlib
import ctypes
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal

import torch

from .loop import RegularizedTrainer
from .metrics import StepMetrics
from .objective import NonFiniteLossError

Status = Literal["running", "completed", "cancelled", "diverged", "failed"]


@dataclass
class JobResult:
    status: Status
    steps_done: int
    message: str = ""


class TrainingJob:
    """One training run, until ``trainer.config.steps`` or a stop: in its own thread
    (:meth:`start`, then :meth:`poll` / :meth:`wait`) or in the caller's (:meth:`run_here`)."""

    def __init__(self, trainer: RegularizedTrainer, name: str = "lipschitz-train") -> None:
        self.trainer = trainer
        self._events: queue.SimpleQueue[StepMetrics] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._result = JobResult("running", trainer.step_count)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "TrainingJob":
        self._thread.start()
        return self

    def _run(self) -> None:
        _name_os_thread(self._thread.name)
        try:
            self._result = self._train(self._events.put, self._cancel.is_set)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
            self._error = exc
            self._result = JobResult("failed", self.trainer.step_count, f"{type(exc).__name__}: {exc}")
        finally:
            self._done.set()

    def run_here(self, on_step: Callable[[StepMetrics], None], stop: Callable[[], bool]) -> JobResult:
        """Train in the calling thread: ``on_step`` gets each step's metrics, ``stop()`` is asked
        before every step (True: the run ends ``cancelled``); any other error propagates.

        Why not a thread: on a CPU each thread that runs torch ops gets its own OpenMP team, and
        with more OpenMP threads alive than cores libgomp cuts its spin-wait, so every parallel
        region pays a futex wake-up.  A training step in a second thread measured 1.2-1.3x the
        same step in the thread that already owns a team (2 cores, docs/performance.md); a host
        whose node runs in a worker thread (ComfyUI) trains fastest right there.
        """
        with _os_thread_named(self._thread.name):
            return self._train(on_step, lambda: self._cancel.is_set() or stop())

    def _train(self, emit: Callable[[StepMetrics], None], stop: Callable[[], bool]) -> JobResult:
        """The loop shared by both ways of running: steps until done, a stop or divergence."""
        trainer, total = self.trainer, self.trainer.config.steps
        first, started = trainer.step_count, time.perf_counter()
        # Grad mode is thread-local: ComfyUI runs nodes under inference_mode, which must not
        # leak into (or be changed for) anything but this loop.
        try:
            with torch.inference_mode(False), torch.enable_grad():
                while trainer.step_count < total:
                    if stop():
                        return JobResult("cancelled", trainer.step_count, "cancelled by the user")
                    metrics = trainer.step()
                    rate = (trainer.step_count - first) / max(time.perf_counter() - started, 1e-9)
                    emit(replace(metrics, steps_per_s=rate, eta_s=(total - trainer.step_count) / rate))
        except NonFiniteLossError as exc:
            return JobResult("diverged", trainer.step_count, str(exc))
        return JobResult("completed", trainer.step_count)

    # -- caller side ----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the worker to stop before its next step (the current one completes)."""
        self._cancel.set()

    def poll(self, timeout: float | None = None) -> list[StepMetrics]:
        """Events since the last poll; waits up to ``timeout`` s for one or for the end."""
        events: list[StepMetrics] = []
        try:
            events.append(self._events.get(timeout=timeout) if timeout else self._events.get_nowait())
        except queue.Empty:
            return events
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> JobResult:
        """Join the worker; re-raise its exception here, else return how the run ended."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("training thread still running")
        if self._error is not None:
            raise self._error
        return self._result


def _name_os_thread(name: str) -> str | None:
    """Give the calling thread ``name`` in the OS too (``top -H``, ``py-spy``,
    ``/proc/<pid>/task/*/comm``): Python before 3.14 names threads for Python only.  Returns the
    name it had (``None`` where it cannot be read).  Linux only; best effort."""
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
    a host's worker thread shows that it is training, as the job's own thread does."""
    old = _name_os_thread(name)
    try:
        yield
    finally:
        if old is not None:
            _name_os_thread(old)
