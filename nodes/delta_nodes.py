"""``LipschitzSaveDelta`` and ``LipschitzApplyDelta``: a trained delta as a file and back."""
from __future__ import annotations

from comfy_api.latest import io

from ..trainer.errors import NodeInputError
from ..trainer.files.delta_file import TrainedDelta, load_delta_file, save_delta_file
from .host.folders import FOLDER, delta_dir, delta_files, next_free
from .host.model import fingerprint, load_for_reading, require_sd15
from .host.patches import SAMPLING, patched_model, require_sampling, sampling_note
from .host.progress import send_text
from .host.types import DeltaType
from .personalize import SAMPLING_TOOLTIP


class LipschitzSaveDelta(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzSaveDelta",
            display_name="Save Lipschitz Delta",
            category="personalization/lipschitz",
            description="Write the delta to models/lipschitz_deltas as .safetensors (stock LoraLoaderModelOnly loads it too).",
            inputs=[DeltaType.Input("delta"), io.String.Input("filename_prefix", default="lipschitz_delta")],
            outputs=[io.String.Output(display_name="filename")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, delta: TrainedDelta, filename_prefix: str) -> io.NodeOutput:
        path = save_delta_file(next_free(filename_prefix), delta)
        return io.NodeOutput(path.name, ui={"text": [f"{FOLDER}/{path.name}"]})


class LipschitzApplyDelta(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        delta_dir()
        return io.Schema(
            node_id="LipschitzApplyDelta",
            display_name="Apply Lipschitz Delta",
            category="personalization/lipschitz",
            description="MODEL + a saved delta x strength -> personalized MODEL (the base MODEL is left as it is).",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("delta_file", options=delta_files()),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05),
                io.Combo.Input("sampling", options=list(SAMPLING), default="patch", optional=True,
                               tooltip=SAMPLING_TOOLTIP),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, delta_file: str, strength: float, sampling: str = "patch") -> io.NodeOutput:
        require_sd15(model)
        require_sampling(sampling)
        if delta_file not in delta_files():
            raise NodeInputError("delta_file", f"{delta_file!r} is not a .safetensors file in models/{FOLDER}",
                                 "Pick a file from the list (press R to refresh it)")
        path = delta_dir() / delta_file
        shapes = {n: tuple(p.shape) for n, p in model.model.diffusion_model.named_parameters()}
        delta, _, _ = load_delta_file(path, shapes)
        trained_on = delta.meta.get("base_fingerprint")
        if trained_on and trained_on != fingerprint(load_for_reading(model)):
            raise NodeInputError("model", f"{delta_file} was trained on a different base model ({trained_on})",
                                 "Connect the checkpoint it was trained on, or load it with LoraLoaderModelOnly to apply it anyway")
        note = sampling_note(model, delta.tensors, strength, sampling)
        if note:
            send_text(cls.hidden.unique_id or "0", note)
        return io.NodeOutput(patched_model(model, delta.tensors, strength, sampling))
