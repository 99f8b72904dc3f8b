"""Run a :class:`~trainer.loop.RegularizedTrainer` in a background thread.

The caller (a ComfyUI node, the toy, a script) polls :meth:`TrainingJob.poll` for the steps'
:class:`~trainer.metrics.StepMetrics` (with speed and ETA), may :meth:`~TrainingJob.cancel`, and gets the outcome from :meth:`~TrainingJob.wait`,
which re-raises the worker's exception (with the worker's traceback) in the caller's thread.
The delta is only ever written by a completed optimizer step, so whatever ends the run -
cancel, a non-finite loss, an exception in the forward - leaves a consistent delta whose
step count is ``trainer.step_count``.
"""
from __future__ import annotations

import ctypes
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Literal

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
    """One training run in its own thread, until ``trainer.config.steps`` or a stop."""

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
        trainer, total = self.trainer, self.trainer.config.steps
        first, started = trainer.step_count, time.perf_counter()
        # Grad mode is thread-local: ComfyUI runs nodes under inference_mode, which must not
        # leak into (or be changed for) anything but this thread.
        try:
            with torch.inference_mode(False), torch.enable_grad():
                while trainer.step_count < total:
                    if self._cancel.is_set():
                        self._result = JobResult("cancelled", trainer.step_count, "cancelled by the user")
                        return
                    metrics = trainer.step()
                    rate = (trainer.step_count - first) / max(time.perf_counter() - started, 1e-9)
                    self._events.put(replace(metrics, steps_per_s=rate, eta_s=(total - trainer.step_count) / rate))
            self._result = JobResult("completed", trainer.step_count)
        except NonFiniteLossError as exc:
            self._result = JobResult("diverged", trainer.step_count, str(exc))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
            self._error = exc
            self._result = JobResult("failed", trainer.step_count, f"{type(exc).__name__}: {exc}")
        finally:
            self._done.set()

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


def _name_os_thread(name: str) -> None:
    """Give the worker its name in the OS too (``top -H``, ``py-spy``, ``/proc/<pid>/task/*/comm``):
    Python before 3.14 names threads for Python only.  Linux only; best effort."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
