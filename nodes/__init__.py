"""The pack's ComfyUI nodes: thin adapters around :mod:`trainer`, and the extension listing them."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .delta_nodes import LipschitzApplyDelta, LipschitzSaveDelta
from .grid import LipschitzLabeledGrid
from .lora_export import LipschitzExtractLoRA
from .metrics import (LipschitzDrift, LipschitzEvalModelLoader, LipschitzMetricsTable, LipschitzPromptFidelity,
                      LipschitzSubjectFidelity)
from .personalize import LipschitzPersonalize
from .reference_images import LipschitzLoadReferenceImages
from .report import LipschitzTrainingReport

NODES = [
    LipschitzLoadReferenceImages,
    LipschitzPersonalize,
    LipschitzSaveDelta,
    LipschitzApplyDelta,
    LipschitzExtractLoRA,
    LipschitzTrainingReport,
    LipschitzLabeledGrid,
    LipschitzEvalModelLoader,
    LipschitzSubjectFidelity,
    LipschitzPromptFidelity,
    LipschitzDrift,
    LipschitzMetricsTable,
]


class LipschitzExtension(ComfyExtension):
    """The pack as ComfyUI sees it (returned by the root ``comfy_entrypoint``)."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
