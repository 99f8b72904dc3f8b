"""``LipschitzLabeledGrid``: IMAGE batches -> one labelled comparison grid (stock ComfyUI has none)."""
from __future__ import annotations

from comfy_api.latest import io

from ..trainer.evaluation.evaluate import row_lines
from ..trainer.render.grid import MAX_ROWS, make_grid, parse_labels
from .host.types import MetricsType


class LipschitzLabeledGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzLabeledGrid",
            display_name="Labeled Image Grid",
            category="personalization/lipschitz",
            description="One comparison image: each IMAGE batch is a row, labelled on the left; "
                        "column labels on top; optional title. Rows are resized to the first row's cell size. "
                        "A row's metrics (from the metric nodes) are printed under its label.",
            inputs=[
                io.Image.Input("images_1", tooltip="First row (an IMAGE batch: one column per image)"),
                io.String.Input("row_labels", default="", multiline=True,
                                tooltip="One label per line, one line per connected row (empty: no row labels)"),
                io.String.Input("column_labels", default="", multiline=True,
                                tooltip="One label per line, one line per column (empty: no column labels)"),
                *[io.Image.Input(f"images_{i}", optional=True) for i in range(2, MAX_ROWS + 1)],
                io.String.Input("title", default="", optional=True),
                *[MetricsType.Input(f"metrics_{i}", optional=True, tooltip=f"Numbers to print under row {i}'s label")
                  for i in range(1, MAX_ROWS + 1)],
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, images_1, row_labels: str, column_labels: str, title: str = "", **more) -> io.NodeOutput:
        connected = [1] + [i for i in range(2, MAX_ROWS + 1) if more.get(f"images_{i}") is not None]
        rows = [images_1] + [more[f"images_{i}"] for i in connected[1:]]
        notes = [row_lines(more[f"metrics_{i}"]) if more.get(f"metrics_{i}") is not None else [] for i in connected]
        return io.NodeOutput(make_grid(rows, parse_labels(row_labels), parse_labels(column_labels), title or "", notes))
