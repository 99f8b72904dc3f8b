"""``LipschitzTrainingReport``: TRAINING_LOGs -> one IMAGE of denoise loss, L_lip and ||delta||."""
from __future__ import annotations

from comfy_api.latest import io

from ..trainer.render.plot import render_report
from .host.types import TrainingLogType

MAX_LOGS = 8


class LipschitzTrainingReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzTrainingReport",
            display_name="Lipschitz Training Report",
            category="personalization/lipschitz",
            description="Plot the denoise loss, L_lip and ||delta|| over steps for one or more runs, "
                        "labelled by lambda.",
            inputs=[TrainingLogType.Input("log_1"),
                    *[TrainingLogType.Input(f"log_{i}", optional=True) for i in range(2, MAX_LOGS + 1)]],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, log_1, **more) -> io.NodeOutput:
        logs = [log_1] + [more[f"log_{i}"] for i in range(2, MAX_LOGS + 1) if more.get(f"log_{i}") is not None]
        return io.NodeOutput(render_report(logs))
