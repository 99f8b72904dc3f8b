"""``LipschitzPersonalize``: the paper's fine-tune on the host GPU, as a ComfyUI node.

The node validates everything first, then either loads a finished run from disk or trains in
a :class:`trainer.job.TrainingJob` thread while it relays progress and watches for the UI's
Cancel.  Whatever stops a run early, its delta and resume state are saved before the error
or interrupt reaches ComfyUI.  The base MODEL is never written: the output is a clone
carrying the delta as patches.
"""
from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io

import comfy.model_management

from ..trainer.delta import ParameterDelta
from ..trainer.job import TrainingJob
from ..trainer.loop import CachedExamples, RegularizedTrainer, TrainConfig
from ..trainer.objective import KINDS
from ..trainer.persist import flatten_trainer_state, unflatten_trainer_state

from . import comfy_adapter as adapter
from .comfy_adapter import NodeInputError
from .delta_store import (Delta, TrainingLog, auto_path, load_delta_file, partial_path, run_key, save_delta)
from .images import resize_batch
from .progress import NodeProgress
from .types import DeltaType, TrainingLogType

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _validate(prompt: str, lambda_reg: float, steps: int, learning_rate: float, resolution: int,
              batch_size: int, images, class_images, class_prompt: str, prior_weight: float,
              regularizer: str, precision: str) -> None:
    checks = [
        ("regularizer", regularizer in KINDS, f"unknown kind {regularizer!r}", f"Use one of {', '.join(KINDS)}"),
        ("precision", precision in PRECISIONS, f"unknown precision {precision!r}", "Use fp32 (the paper) or bf16"),
        ("prompt", bool(prompt and prompt.strip()), "the prompt is empty", 'Write the instance prompt, e.g. "a photo of sks dog"'),
        ("lambda_reg", math.isfinite(lambda_reg) and lambda_reg >= 0, f"lambda must be a number >= 0, got {lambda_reg}",
         "Use 500 (the paper), 0 for plain fine-tuning, larger to preserve more"),
        ("steps", steps >= 1, f"steps must be at least 1, got {steps}", "Use 1000 (the paper) or fewer for a quick try"),
        ("learning_rate", math.isfinite(learning_rate) and learning_rate > 0, f"the learning rate must be > 0, got {learning_rate}",
         "Use 2e-6 (the paper)"),
        ("resolution", resolution >= 64 and resolution % 64 == 0, f"resolution must be a multiple of 64, got {resolution}",
         "Use 512 for SD1.5"),
        ("batch_size", batch_size >= 1, f"batch size must be at least 1, got {batch_size}", "Use 1 (the paper)"),
        ("images", images is not None and images.shape[0] >= 1, "no reference image", "Connect 3-6 photos of the subject"),
        ("prior_weight", math.isfinite(prior_weight) and prior_weight >= 0, f"prior weight must be >= 0, got {prior_weight}",
         "Use 1.0 (DreamBooth)"),
    ]
    for name, ok, problem, fix in checks:
        if not ok:
            raise NodeInputError(name, problem, fix)
    if class_images is not None and not (class_prompt and class_prompt.strip()):
        raise NodeInputError("class_prompt", "class images are connected but the class prompt is empty",
                             'Write the class prompt, e.g. "a photo of a dog"')


class LipschitzPersonalize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzPersonalize",
            display_name="Lipschitz Personalize (SD1.5)",
            category="personalization/lipschitz",
            description="Fine-tune the SD1.5 U-Net on 3-6 photos with the Lipschitz regularizer "
                        "(lambda trades subject fidelity against drift). Trains in a background thread.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="3-6 photos of the subject (any IMAGE batch)"),
                io.String.Input("prompt", default="a photo of sks dog", multiline=True,
                                tooltip="Instance prompt: a rare token (sks) and the class word"),
                io.Float.Input("lambda_reg", default=500.0, min=0.0, max=1e9, step=10.0, round=1e-6,
                               tooltip="Regularization strength: 0 = plain fine-tune, 500 = paper, larger = less drift"),
                io.Int.Input("steps", default=1000, min=1, max=100000),
                io.Float.Input("learning_rate", default=2e-6, min=0.0, max=1.0, step=1e-7, round=1e-10),
                io.Int.Input("seed", default=2025, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Fixed by default: the same seed reproduces (and reloads) the same run"),
                io.Combo.Input("regularizer", options=list(KINDS), default="mean_sq", optional=True,
                               tooltip="mean_sq = the paper (per-tensor mean); sum_sq and l1 are variants"),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp32", optional=True,
                               tooltip="fp32 = the paper; bf16 computes in bf16 with fp32 deltas (faster, less VRAM)"),
                io.Boolean.Input("gradient_checkpointing", default=True, optional=True,
                                 tooltip="Recompute activations in backward: much less VRAM, ~30% slower"),
                io.Int.Input("batch_size", default=1, min=1, max=64, optional=True),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64, optional=True),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue a run of the same settings that was stopped early"),
                io.Image.Input("class_images", optional=True, tooltip="DreamBooth prior preservation: class photos"),
                io.String.Input("class_prompt", default="", optional=True, tooltip='e.g. "a photo of a dog"'),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=1000.0, step=0.1, optional=True),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                DeltaType.Output(display_name="DELTA"),
                TrainingLogType.Output(display_name="TRAINING_LOG"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, prompt, lambda_reg, steps, learning_rate, seed,
                regularizer="mean_sq", precision="fp32", gradient_checkpointing=True, batch_size=1,
                resolution=512, resume=False, class_images=None, class_prompt="", prior_weight=1.0) -> io.NodeOutput:
        _validate(prompt, lambda_reg, steps, learning_rate, resolution, batch_size, images,
                  class_images, class_prompt, prior_weight, regularizer, precision)
        adapter.require_sd15(model)
        progress = NodeProgress(cls.hidden.unique_id or "0", steps, lambda_reg)
        if images.shape[0] == 1:
            progress.text("warning: only 1 reference image; 3-6 give a far better subject")
            log.warning("LipschitzPersonalize: only 1 reference image")
        images = resize_batch(images, resolution)
        class_images = resize_batch(class_images, resolution) if class_images is not None else None
        cond, truncated = adapter.encode_prompt(clip, prompt)
        if truncated:
            progress.text("notice: the prompt is longer than 77 tokens; only the first 77 are used")
            log.warning("LipschitzPersonalize: prompt truncated to 77 tokens")
        class_cond = adapter.encode_prompt(clip, class_prompt)[0] if class_images is not None else None

        config = TrainConfig(steps=steps, lr=learning_rate, lam=lambda_reg, regularizer=regularizer,
                             seed=seed, prior_weight=prior_weight)
        latents = adapter.encode_images(vae, model, images, seed)
        class_latents = adapter.encode_images(vae, model, class_images, seed + 1) if class_images is not None else None
        loaded = adapter.load_for_training(model, PRECISIONS[precision])
        base_id = adapter.fingerprint(loaded.unet)
        parts = {"prompt": prompt, "config": config.__dict__, "precision": precision, "batch": batch_size,
                 "resolution": resolution, "class_prompt": class_prompt if class_images is not None else None,
                 "base": base_id}
        key = run_key(parts, [images] + ([class_images] if class_images is not None else []))
        meta = {"lambda": str(lambda_reg), "steps": str(steps), "learning_rate": str(learning_rate),
                "seed": str(seed), "regularizer": regularizer, "precision": precision, "prompt": prompt,
                "base_fingerprint": base_id, "run_key": key}
        label = f"lambda={lambda_reg:g}"

        shapes = {n: tuple(p.shape) for n, p in loaded.unet.named_parameters()}
        done = auto_path(key)
        cached = None
        if done.exists():
            try:
                cached = load_delta_file(done, shapes)
            except NodeInputError as exc:  # damaged cache entry: keep it aside for inspection, retrain
                aside = done.with_name(done.name + ".corrupt")
                done.replace(aside)
                log.warning("LipschitzPersonalize: %s; moved to %s, training again", exc, aside.name)
                progress.text(f"warning: the saved run {done.name} is damaged ({exc}); moved it to "
                              f"{aside.name} and training again")
        if cached is not None:
            delta, _, saved_log = cached
            progress.text(f"loaded the finished run from models/lipschitz_deltas/{done.name} (no training needed)")
            progress.bar.update_absolute(steps)
            progress.finish("loaded")
            return io.NodeOutput(adapter.patched_model(model, delta.tensors), delta,
                                 saved_log or TrainingLog(label, lambda_reg, status="loaded"))

        delta, training_log = _train(model, loaded, latents, cond, class_latents, class_cond, config,
                                     gradient_checkpointing, batch_size, resume, key, meta, label, progress)
        return io.NodeOutput(adapter.patched_model(model, delta.tensors), delta, training_log)


def _train(model, loaded: adapter.LoadedUNet, latents, cond, class_latents, class_cond, config: TrainConfig,
           gradient_checkpointing: bool, batch_size: int, resume: bool, key: str, meta: dict[str, str],
           label: str, progress: NodeProgress) -> tuple[Delta, TrainingLog]:
    """Train in the job thread while relaying progress; save the result or the partial run."""
    dev = loaded.device
    training_log = TrainingLog(label, config.lam)
    with torch.inference_mode(False):
        # Tensors made under ComfyUI's inference mode cannot be saved for backward.
        data = CachedExamples(latents.to(dev).clone(), cond.to(dev).clone(), batch_size)
        prior = (CachedExamples(class_latents.to(dev).clone(), class_cond.to(dev).clone(), batch_size)
                 if class_latents is not None else None)
        delta = ParameterDelta(loaded.unet, device=dev)
        trainer = RegularizedTrainer(loaded.eps, delta, adapter.alphas_cumprod(model), data, config, prior=prior,
                                     checkpoint=adapter.checkpoint_units(loaded.unet) if gradient_checkpointing else ())
        partial = partial_path(key)
        if resume and partial.exists():
            try:
                saved, extra, saved_log = load_delta_file(partial, {n: tuple(t.shape) for n, t in delta.delta.items()})
                state = unflatten_trainer_state({**{f"delta.{n}": t for n, t in saved.tensors.items()}, **extra},
                                                saved.meta, delta.names)
                trainer.load_state_dict(state)
            except (NodeInputError, KeyError, ValueError, RuntimeError) as exc:
                raise NodeInputError("resume", f"the saved partial run {partial.name} cannot be resumed ({exc})",
                                     "Turn resume off to train from step 0 (the file is replaced by the new run)") from exc
            training_log = saved_log or training_log
            progress.text(f"resuming at step {trainer.step_count} from {partial.name}")
        elif resume:
            progress.text("resume: no stopped run of these settings was found; training from step 0")
    start_step = trainer.step_count
    job = TrainingJob(trainer).start()

    def save(path, status: str) -> Delta:
        result = Delta(delta.state_dict(), {**meta, "steps_done": str(trainer.step_count), "status": status})
        training_log.status = status
        extra = None
        if status != "completed":
            tensors, state_meta = flatten_trainer_state(trainer.state_dict(), delta.names)
            extra = {k: v for k, v in tensors.items() if not k.startswith("delta.")}
            result.meta.update(state_meta)
        save_delta(path, result, extra, training_log)
        return result

    def relay(events) -> None:
        for event in events:
            data_ = event.as_dict()
            training_log.add(data_)
            progress.step(data_)

    try:
        while not job.done:
            relay(job.poll(0.1))
            if comfy.model_management.processing_interrupted():
                job.cancel()
        relay(job.poll())
        outcome = job.wait()
    except BaseException as exc:
        job.cancel()
        try:
            job.wait()
        except BaseException:  # noqa: BLE001 - the first error is the one to report
            pass
        state = "interrupted" if isinstance(exc, comfy.model_management.InterruptProcessingException) else "failed"
        if trainer.step_count > start_step:
            saved = save(partial, state)
            log.warning("LipschitzPersonalize: stopped at step %d; saved %s", saved.steps_done, partial.name)
        progress.finish(state)
        raise
    if outcome.status == "cancelled":
        save(partial, "interrupted")
        progress.finish("interrupted")
        raise comfy.model_management.InterruptProcessingException()
    if outcome.status == "diverged":
        save(partial, "diverged")
        progress.finish("diverged")
        raise RuntimeError(f"Training diverged: {outcome.message}. The last good delta "
                           f"({outcome.steps_done} steps) was saved as models/lipschitz_deltas/{partial.name}.")
    result = save(auto_path(key), "completed")
    partial.unlink(missing_ok=True)
    progress.finish("completed")
    progress.text(f"done: {outcome.steps_done} steps, |delta| {training_log.delta_norm[-1]:.4f}; "
                  f"saved models/lipschitz_deltas/{auto_path(key).name}")
    return result, training_log
