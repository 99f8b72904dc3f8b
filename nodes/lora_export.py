"""``LipschitzExtractLoRA``: a trained delta -> a kohya-format LoRA file to share (models/loras)."""
from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from ..trainer.files.delta_file import TrainedDelta
from ..trainer.errors import NodeInputError
from .host.folders import FOLDER, delta_dir, delta_files, next_free
from .host.lora_file import export_lora, lora_dir, read_delta_file
from .host.progress import send_text
from .host.types import DeltaType

NO_FILE = "(use the DELTA input)"
ONE_D = {"drop": False, "keep (ComfyUI only)": True}


class LipschitzExtractLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        delta_dir()
        return io.Schema(
            node_id="LipschitzExtractLoRA",
            display_name="Export Lipschitz Delta as LoRA",
            category="personalization/lipschitz",
            description="Truncated SVD of each weight's delta -> a kohya-format LoRA in models/loras "
                        "(tens of MB instead of 1.7 GB; loads in LoraLoaderModelOnly, A1111/Forge, diffusers).",
            inputs=[
                io.Int.Input("rank", default=16, min=1, max=4096,
                             tooltip="Rank of each factor pair: higher keeps more of the delta and makes a larger file."),
                io.String.Input("filename_prefix", default="lipschitz_lora"),
                DeltaType.Input("delta", optional=True, tooltip="A trained delta (from Lipschitz Personalize)."),
                io.Combo.Input("delta_file", options=[NO_FILE, *delta_files()], default=NO_FILE, optional=True,
                               tooltip=f"Or a delta file in models/{FOLDER}."),
                io.Combo.Input("biases_and_norms", options=list(ONE_D), default="drop", optional=True,
                               tooltip="drop: every LoRA loader reads the file (their share of the delta is shown). "
                                       "keep: stored whole as diff keys; ComfyUI applies them, diffusers refuses the file."),
            ],
            outputs=[io.String.Output(display_name="filename")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, rank: int, filename_prefix: str, delta: TrainedDelta | None = None,
                delta_file: str = NO_FILE, biases_and_norms: str = "drop") -> io.NodeOutput:
        if biases_and_norms not in ONE_D:
            raise NodeInputError("biases_and_norms", f"{biases_and_norms!r} is not one of {list(ONE_D)}", "Pick one")
        if (delta is None) == (delta_file == NO_FILE):
            raise NodeInputError("delta", "connect a DELTA or pick a delta_file, not both and not neither",
                                 "Connect Lipschitz Personalize's DELTA output, or pick a saved delta file")
        if delta is None:
            if delta_file not in delta_files():
                raise NodeInputError("delta_file", f"{delta_file!r} is not a .safetensors file in models/{FOLDER}",
                                     "Pick a file from the list (press R to refresh it)")
            delta, source = read_delta_file(delta_dir() / delta_file), delta_file
        else:
            source = f"run {delta.meta.get('run_key', 'unsaved')}"
        node_id = cls.hidden.unique_id or "0"
        path = next_free(filename_prefix, lora_dir())
        bar = comfy.utils.ProgressBar(len(delta.tensors), node_id=node_id)

        def progress(i: int, n: int, name: str) -> None:
            bar.update_absolute(i)
            if i % 50 == 0 or i == n:
                send_text(node_id, f"SVD {i}/{n}: {name}")

        stats = export_lora(delta, rank, path, source, ONE_D[biases_and_norms], progress)
        one_d = (f"biases and norms kept ({stats.kept_1d})" if stats.kept_1d else
                 f"biases and norms dropped ({len(stats.dropped)}, {stats.dropped_fraction:.1%} of the delta's norm)")
        text = (f"loras/{path.name}: rank {rank}, {path.stat().st_size / 1e6:.1f} MB, "
                f"relative error {stats.rel_error:.3f} (||delta - LoRA|| / ||delta||); {one_d}")
        return io.NodeOutput(path.name, ui={"text": [text]})
