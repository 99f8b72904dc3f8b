"""``LipschitzLabeledGrid``: IMAGE batches -> one labelled comparison grid (stock ComfyUI has none)."""
from __future__ import annotations

from comfy_api.latest import io

from .host.grid import MAX_ROWS, make_grid, parse_labels


class LipschitzLabeledGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzLabeledGrid",
            display_name="Labeled Image Grid",
            category="personalization/lipschitz",
            description="One comparison image: each IMAGE batch is a row, labelled on the left; "
                        "column labels on top; optional title. Rows are resized to the first row's cell size.",
            inputs=[
                io.Image.Input("images_1", tooltip="First row (an IMAGE batch: one column per image)"),
                io.String.Input("row_labels", default="", multiline=True,
                                tooltip="One label per line, one line per connected row (empty: no row labels)"),
                io.String.Input("column_labels", default="", multiline=True,
                                tooltip="One label per line, one line per column (empty: no column labels)"),
                *[io.Image.Input(f"images_{i}", optional=True) for i in range(2, MAX_ROWS + 1)],
                io.String.Input("title", default="", optional=True),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, images_1, row_labels: str, column_labels: str, title: str = "", **more) -> io.NodeOutput:
        rows = [images_1] + [more[f"images_{i}"] for i in range(2, MAX_ROWS + 1) if more.get(f"images_{i}") is not None]
        return io.NodeOutput(make_grid(rows, parse_labels(row_labels), parse_labels(column_labels), title or ""))
