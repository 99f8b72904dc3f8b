"""The pack's own socket types."""
from comfy_api.latest import io

DeltaType = io.Custom("DELTA")
TrainingLogType = io.Custom("TRAINING_LOG")
