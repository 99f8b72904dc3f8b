"""What a training step reports, and a run's record of it: one shape from the loop to the chart.

:class:`StepMetrics` is made by the loop, gets its speed from the job, and is what the host's
progress events, the run's :class:`TrainingLog` (saved in the delta file's metadata), the
frontend chart and the training report read, under the same field names.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepMetrics:
    """One completed step.  ``lip`` and ``delta_norm`` are of the delta after the step."""

    step: int
    total: int
    loss: float
    """The total ``L_denoise (+ prior) + lambda * L_lip`` as the step reports it: the denoise
    (and prior) term of this step's forward, taken *before* the update, plus ``lambda * lip``
    of the delta *after* it (``lip`` below), so it is not the objective at any one theta.
    The node's text and chart show ``denoise``, never this field."""
    denoise: float
    prior: float | None
    lip: float
    delta_norm: float
    seconds: float = 0.0
    steps_per_s: float = 0.0
    eta_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingLog:
    """The steps of one run, labelled for the report (e.g. ``lambda=500``)."""

    label: str
    lam: float
    records: list[StepMetrics] = field(default_factory=list)
    status: str = "completed"

    def add(self, metrics: StepMetrics) -> None:
        self.records.append(metrics)

    def series(self, name: str) -> list[float]:
        """One field over the steps, e.g. ``series("denoise")``."""
        return [getattr(r, name) for r in self.records]

    def to_json(self) -> str:
        return json.dumps({"label": self.label, "lam": self.lam, "status": self.status,
                           "records": [r.as_dict() for r in self.records]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "TrainingLog":
        data = json.loads(text)
        return cls(data["label"], data["lam"], [StepMetrics(**r) for r in data["records"]], data["status"])
