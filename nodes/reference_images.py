"""``LipschitzLoadReferenceImages``: a folder of photos -> IMAGE batch at the training size."""
from __future__ import annotations

import hashlib

from comfy_api.latest import io

import folder_paths

from ..trainer.render.images import CROP_MODES, image_files, load_folder, resolve_folder


class LipschitzLoadReferenceImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzLoadReferenceImages",
            display_name="Load Reference Images (folder)",
            category="personalization/lipschitz",
            description="All jpg/png/webp photos of a sub-folder of ComfyUI's input directory, squared to one size.",
            inputs=[
                io.String.Input("folder", default="subject", tooltip="Sub-folder of ComfyUI's input directory"),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64),
                io.Combo.Input("crop", options=list(CROP_MODES), default="center",
                               tooltip="center crop, stretch (the paper's plain resize) or pad"),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.Int.Output(display_name="count")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, resolution: int, crop: str) -> str:
        """Re-run when a photo in the folder is added, removed or changed."""
        h = hashlib.sha256()
        try:
            for path in image_files(resolve_folder(folder_paths.get_input_directory(), folder)):
                st = path.stat()
                h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        except ValueError as exc:
            return f"error:{exc}"
        return h.hexdigest()

    @classmethod
    def execute(cls, folder: str, resolution: int, crop: str) -> io.NodeOutput:
        images, _ = load_folder(resolve_folder(folder_paths.get_input_directory(), folder), resolution, crop)
        return io.NodeOutput(images, images.shape[0])
