"""``LipschitzTrainingReport``: TRAINING_LOGs -> one IMAGE of loss, L_lip and ||delta||."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from .delta_store import TrainingLog
from .plot import ema, report
from .types import TrainingLogType


def render(logs: list[TrainingLog]) -> torch.Tensor:
    panels = [
        ("denoise loss (EMA 0.1)", [(l.label, l.steps, ema(l.denoise)) for l in logs]),
        ("L_lip = sum_i mean(delta_i^2)", [(l.label, l.steps, l.lip) for l in logs]),
        ("||delta||", [(l.label, l.steps, l.delta_norm) for l in logs]),
    ]
    img = report(panels)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class LipschitzTrainingReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzTrainingReport",
            display_name="Lipschitz Training Report",
            category="personalization/lipschitz",
            description="Plot loss, L_lip and ||delta|| over steps for one or more runs, labelled by lambda.",
            inputs=[TrainingLogType.Input("log_1"), *[TrainingLogType.Input(f"log_{i}", optional=True) for i in range(2, 9)]],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, log_1: TrainingLog, **more: TrainingLog) -> io.NodeOutput:
        logs = [log_1] + [more[k] for k in sorted(more, key=lambda k: int(k.split("_")[1])) if more[k] is not None]
        return io.NodeOutput(render(logs))
