"""The pack's ComfyUI nodes: thin adapters around :mod:`trainer`."""
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
