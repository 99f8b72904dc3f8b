"""The pack's own socket types."""
from comfy_api.latest import io

DeltaType = io.Custom("DELTA")
TrainingLogType = io.Custom("TRAINING_LOG")
EvalModelType = io.Custom("LIPSCHITZ_EVAL_MODEL")    # a CLIP or DINO encoder (trainer.evaluation.encoders)
MetricsType = io.Custom("LIPSCHITZ_METRICS")         # one model's scores (trainer.evaluation.evaluate.MetricsRow)
