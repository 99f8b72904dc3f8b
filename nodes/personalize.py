"""``LipschitzPersonalize``: the paper's fine-tune on the host GPU, as a ComfyUI node.

The widgets' defaults are the paper's (:class:`trainer.config.TrainConfig`); the
work - validation, cache, training in ComfyUI's worker thread, resume, saving - is
:func:`.host.run.personalize`.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config import DEFAULTS, PRECISIONS, REGULARIZERS, TrainConfig
from ..trainer.files.delta_file import DEFAULT_DELTA_DTYPE, DELTA_DTYPES
from ..trainer.memory import CHOICES as MEMORY_CHOICES
from ..trainer.memory import MODES
from ..trainer.preview import DEFAULT_EVERY, DEFAULT_SAMPLER_STEPS, DEFAULT_SIZE
from .host.patches import SAMPLING
from .host.run import RunSpec, personalize
from .host.types import DeltaType, EvalModelType, TrainingLogType


SAMPLING_TOOLTIP = ("How the MODEL output carries the delta. patch: ComfyUI's own weight patch (as a LoRA; "
                    "on GPUs it is rounded into the fp16 weights, and the node says how much of the delta that "
                    "loses when it is over 1%). exact: added after each weight is cast, computing the U-Net in "
                    "fp32: every value reaches the sampler, sampling is slower on GPUs.")


class LipschitzPersonalize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzPersonalize",
            display_name="Lipschitz Personalize (SD1.5)",
            category="personalization/lipschitz",
            description="Fine-tune the SD1.5 U-Net on 3-6 photos with the Lipschitz regularizer "
                        "(lambda trades subject fidelity against drift). Trains in ComfyUI's worker thread, so the "
                        "server and the UI stay responsive; Cancel stops it after the current step.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="3-6 photos of the subject (any IMAGE batch)"),
                io.String.Input("prompt", default="a photo of sks dog", multiline=True,
                                tooltip="Instance prompt: a rare token (sks) and the class word"),
                io.Float.Input("lambda_reg", default=DEFAULTS.lam, min=0.0, max=1e9, step=10.0, round=1e-6,
                               tooltip="Regularization strength: 0 = plain fine-tune, 500 = paper, larger = less drift"),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=100000),
                io.Float.Input("learning_rate", default=DEFAULTS.lr, min=0.0, max=1.0, step=1e-7, round=1e-10),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Fixed by default: the same seed reproduces (and reloads) the same run"),
                io.Combo.Input("regularizer", options=list(REGULARIZERS), default=DEFAULTS.regularizer, optional=True,
                               tooltip="mean_sq = the paper (per-tensor mean); sum_sq and l1 are variants"),
                io.Combo.Input("precision", options=list(PRECISIONS), default=DEFAULTS.precision, optional=True,
                               tooltip="fp32 = the paper; bf16 computes forward and backward in bf16 (faster, less VRAM; "
                                       "the delta keeps the memory mode's dtype)"),
                io.Boolean.Input("gradient_checkpointing", default=DEFAULTS.gradient_checkpointing, optional=True,
                                 tooltip="Recompute activations in backward: much less VRAM, ~30% slower"),
                io.Int.Input("batch_size", default=DEFAULTS.batch_size, min=1, max=64, optional=True),
                io.Int.Input("resolution", default=DEFAULTS.resolution, min=64, max=2048, step=64, optional=True),
                io.Combo.Input("delta_dtype", options=list(DELTA_DTYPES), default=DEFAULT_DELTA_DTYPE, optional=True,
                               tooltip="How the trained delta is stored and applied: fp16 (half the size of fp32; "
                                       "the MODEL uses exactly the stored values), bf16, or fp32 (exact, and a "
                                       "stopped run then resumes bitwise; otherwise its Adam state is kept in 8 bits)"),
                io.Combo.Input("memory", options=list(MEMORY_CHOICES), default="auto", optional=True,
                               tooltip="How much memory the training may use. auto (default): the most faithful "
                                       "mode whose estimate fits the free memory. "
                                       + " ".join(f"{m}: {mode.changes}." for m, mode in MODES.items())
                                       + " A mode that does not fit is refused before training starts."),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue a run of the same settings that was stopped early"),
                io.Image.Input("class_images", optional=True, tooltip="DreamBooth prior preservation: class photos"),
                io.String.Input("class_prompt", default="", optional=True, tooltip='e.g. "a photo of a dog"'),
                io.Float.Input("prior_weight", default=DEFAULTS.prior_weight, min=0.0, max=1000.0, step=0.1, optional=True),
                io.Combo.Input("sampling", options=list(SAMPLING), default="patch", optional=True,
                               tooltip=SAMPLING_TOOLTIP),
                io.Boolean.Input("tf32", default=DEFAULTS.tf32, optional=True,
                                 tooltip="Off (the paper): fp32 matmuls and convolutions are strict fp32. On: NVIDIA "
                                         "GPUs (Ampere and later) compute them with TF32 inputs, faster and slightly "
                                         "less exact. No effect on a CPU"),
                io.Int.Input("preview_every", default=DEFAULT_EVERY, min=0, max=100000, optional=True,
                             tooltip="Sample the preview prompts from the current delta every N training steps, "
                                     "beside the base model's image of the same prompt and seed, and chart the drift "
                                     "(0 = off; the default costs under 10% of the paper's run, docs/preview.md). Skipped, and said so, "
                                     "where it would not fit the memory the pre-flight check planned"),
                io.String.Input("preview_prompts", default="", multiline=True, optional=True,
                                tooltip="One prompt per line: the first shows the subject, the others measure drift. "
                                        'Empty: the instance prompt and the same without its token ("a photo of dog"), '
                                        "or the class prompt when one is set"),
                io.Int.Input("preview_steps", default=DEFAULT_SAMPLER_STEPS, min=1, max=200, optional=True,
                             tooltip="Sampler steps of each preview image (euler, CFG 7)"),
                io.Int.Input("preview_size", default=DEFAULT_SIZE, min=64, max=2048, step=64, optional=True,
                             tooltip="Width and height of the preview images in pixels"),
                EvalModelType.Input("preview_encoder", optional=True,
                                    tooltip="An Evaluation Model Loader's CLIP or DINO: the drift curve becomes 1 - "
                                            "the cosine of its features to the base's image (what the drift metric "
                                            "measures) instead of the pixel distance"),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                DeltaType.Output(display_name="DELTA"),
                TrainingLogType.Output(display_name="TRAINING_LOG"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, prompt, lambda_reg, steps, learning_rate, seed,
                regularizer=DEFAULTS.regularizer, precision=DEFAULTS.precision,
                gradient_checkpointing=DEFAULTS.gradient_checkpointing, batch_size=DEFAULTS.batch_size,
                resolution=DEFAULTS.resolution, resume=False, class_images=None, class_prompt="",
                prior_weight=DEFAULTS.prior_weight, delta_dtype=DEFAULT_DELTA_DTYPE, memory="auto",
                sampling="patch", tf32=DEFAULTS.tf32, preview_every=DEFAULT_EVERY, preview_prompts="",
                preview_steps=DEFAULT_SAMPLER_STEPS, preview_size=DEFAULT_SIZE, preview_encoder=None) -> io.NodeOutput:
        config = TrainConfig(steps=steps, lr=learning_rate, lam=lambda_reg, regularizer=regularizer, seed=seed,
                             batch_size=batch_size, resolution=resolution, gradient_checkpointing=gradient_checkpointing,
                             prior_weight=prior_weight, precision=precision, tf32=tf32)
        spec = RunSpec(model, clip, vae, images, prompt, config, resume, class_images, class_prompt, delta_dtype, memory,
                       cls.hidden.prompt, sampling, preview_every, preview_prompts, preview_steps, preview_size,
                       preview_encoder)
        return io.NodeOutput(*personalize(spec, cls.hidden.unique_id or "0"))
