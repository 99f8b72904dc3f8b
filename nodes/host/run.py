"""One personalization inside ComfyUI: validate, reuse a finished run, or train, resume and save.

A :class:`RunSpec` is what the node was given; :func:`personalize` checks it before any work,
encodes the photos and prompt once, loads ``auto_<key>`` when the same run finished before,
and otherwise trains (:func:`trainer.job.run`) in ComfyUI's worker thread, relaying progress
and checking for the UI's Cancel between steps.  Whatever stops a run early, its delta and
resume state are saved as ``partial_<key>`` before the error or interrupt reaches ComfyUI.  The base MODEL is
never written: the output is a clone carrying the delta as patches.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

import comfy.model_management

from ...trainer import job
from ...trainer.config import ConfigError, TrainConfig
from ...trainer.delta import ParameterDelta
from ...trainer.errors import NodeInputError
from ...trainer.files.delta_file import (DEFAULT_DELTA_DTYPE, DELTA_DTYPES, TrainedDelta, file_nbytes, load_delta_file,
                                         moment_format, run_key, save_delta_file, trainer_state)
from ...trainer.loop import CachedExamples, RegularizedTrainer
from ...trainer.memory import MODES, ORDER, Estimate, between_steps, configure, estimate, preflight
from ...trainer.metrics import TrainingLog
from ...trainer.preview import DEFAULT_SAMPLER_STEPS, DEFAULT_SIZE, PreviewSettings, parse_prompts
from ...trainer.render.images import resize_batch
from .anchor import Anchor, choose_anchor, read_anchor, require_addable
from .attention import attention_note
from .encode import encode_images, encode_prompt
from .folders import auto_path, evict_auto, gb, mark_used, partial_path
from .model import (LoadedUNet, TrainingMemory, alphas_cumprod, checkpoint_units, fingerprint, load_for_training,
                    require_sd15, trainable, training_memory)
from .patches import patched_model, require_sampling, sampling_note
from .preview import PreviewMemory, Previewer
from .progress import NodeProgress, stopped

log = logging.getLogger(__name__)
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# TrainConfig field -> the node input a user sets it with (the rest have the same name).
# The optimizer-state fields come from the memory mode.
INPUT_NAMES = {"lam": "lambda_reg", "lr": "learning_rate", "adam": "memory", "step_in_backward": "memory",
               "moments": "memory", "delta_precision": "memory"}


@dataclass
class RunSpec:
    """What ``LipschitzPersonalize`` was given."""

    model: Any
    clip: Any
    vae: Any
    images: Tensor | None
    prompt: str
    config: TrainConfig
    resume: bool = False
    class_images: Tensor | None = None
    class_prompt: str = ""
    delta_dtype: str = DEFAULT_DELTA_DTYPE
    memory: str = "auto"
    graph: dict | None = None
    """The prompt graph (ComfyUI's hidden PROMPT): where the model input was loaded from."""
    sampling: str = "patch"
    preview_every: int = 0
    """Training steps between previews (0: none)."""
    preview_prompts: str = ""
    """One prompt per line; empty: the instance prompt and the same prompt without its token."""
    preview_steps: int = DEFAULT_SAMPLER_STEPS
    preview_size: int = DEFAULT_SIZE
    preview_encoder: Any = None
    """An evaluation encoder (CLIP or DINO): the drift in its feature space instead of pixels."""

    def preview(self) -> PreviewSettings:
        """What to preview (seeded with the run's seed: the same run shows the same previews)."""
        return PreviewSettings(self.preview_every, parse_prompts(self.preview_prompts, self.prompt, self.class_prompt),
                               self.preview_steps, self.preview_size, self.config.seed)

    def validate(self) -> None:
        """Every input, before any work; the error names the node input and the fix."""
        try:
            self.config.validate()
        except ConfigError as exc:
            raise NodeInputError(INPUT_NAMES.get(exc.field, exc.field), exc.problem, exc.fix) from None
        if not (self.prompt and self.prompt.strip()):
            raise NodeInputError("prompt", "the prompt is empty", 'Write the instance prompt, e.g. "a photo of sks dog"')
        if self.images is None or self.images.shape[0] < 1:
            raise NodeInputError("images", "no reference image", "Connect 3-6 photos of the subject")
        if self.delta_dtype not in DELTA_DTYPES:
            raise NodeInputError("delta_dtype", f"unknown dtype {self.delta_dtype!r}",
                                 f"Use one of {', '.join(DELTA_DTYPES)} (fp16 halves the file of fp32)")
        require_sampling(self.sampling)
        if self.preview_every < 0:
            raise NodeInputError("preview_every", f"{self.preview_every} is negative", "Use 0 (no preview) or a step count")
        if self.preview_size % 8 or self.preview_size < 64:
            raise NodeInputError("preview_size", f"{self.preview_size} px is not a multiple of 8 of at least 64",
                                 "Use e.g. 256 or 512")
        if self.class_images is not None and not (self.class_prompt and self.class_prompt.strip()):
            raise NodeInputError("class_prompt", "class images are connected but the class prompt is empty",
                                 'Write the class prompt, e.g. "a photo of a dog"')
        require_sd15(self.model)


def personalize(spec: RunSpec, node_id: str) -> tuple[Any, TrainedDelta, TrainingLog]:
    """Run ``spec``: (the patched MODEL clone, the delta, its training log)."""
    spec.validate()
    memory = training_memory(spec.model)
    anchors = _anchors(spec, node_id)
    mode, plan, need = _memory_plan(spec, memory, anchors)  # before any work: encoding, loading, delta, Adam state
    anchor = anchors[MODES[mode].anchor]
    require_addable(anchor, mode)
    base, dynamic_note = trainable(spec.model)
    config = configure(spec.config, mode)
    progress = NodeProgress(node_id, config.steps, config.lam)
    with progress.running():
        if spec.images.shape[0] == 1:
            progress.text("warning: only 1 reference image; 3-6 give a far better subject")
            log.warning("LipschitzPersonalize: only 1 reference image")
        images = resize_batch(spec.images, config.resolution)
        class_images = resize_batch(spec.class_images, config.resolution) if spec.class_images is not None else None
        cond, truncated = encode_prompt(spec.clip, spec.prompt)
        if truncated:
            progress.text("notice: the prompt is longer than 77 tokens; only the first 77 are used")
            log.warning("LipschitzPersonalize: prompt truncated to 77 tokens")
        latents = encode_images(spec.vae, spec.model, images, config.seed)
        prior = None
        if class_images is not None:
            prior = (encode_images(spec.vae, spec.model, class_images, config.seed + 1),
                     encode_prompt(spec.clip, spec.class_prompt)[0])
        # The preview's prompts are encoded before the U-Net is loaded for training: loading CLIP
        # later could push the training's model off a GPU.
        previewer = (Previewer(spec.preview(), spec.clip, spec.vae, progress, spec.preview_encoder)
                     if spec.preview_every > 0 else None)
        loaded = load_for_training(base, COMPUTE_DTYPES[config.precision], weights_needed=anchor.file is None)
        base_id = fingerprint(loaded.unet)
        key = run_key({"prompt": spec.prompt, "config": asdict(config), "base": base_id,
                       "delta_dtype": spec.delta_dtype, "anchor": anchor.name,
                       "class_prompt": spec.class_prompt if class_images is not None else None},
                      [images] + ([class_images] if class_images is not None else []))
        meta = {"lambda": str(config.lam), "steps": str(config.steps), "learning_rate": str(config.lr),
                "seed": str(config.seed), "regularizer": config.regularizer, "precision": config.precision,
                "tf32": str(config.tf32),
                "prompt": spec.prompt, "base_fingerprint": base_id, "run_key": key, "delta_dtype": spec.delta_dtype,
                "memory": mode, "anchor_dtype": anchor.name, "anchor": anchor.why}
        label = f"lambda={config.lam:g}"

        finished = _load_finished(key, loaded.unet, progress)
        if finished is not None:
            delta, saved_log = finished
            progress.text(f"loaded the finished run from models/lipschitz_deltas/{auto_path(key).name} "
                          "(no training needed)")
            progress.bar.update_absolute(config.steps)
            progress.finish("loaded")
            training_log = saved_log or TrainingLog(label, config.lam, status="loaded")
        else:
            progress.text("\n".join(n for n in (plan, dynamic_note, attention_note()) if n))
            with torch.inference_mode(False):
                # Tensors made (or loaded) under ComfyUI's inference mode cannot be saved for backward
                # or updated in place.
                training = _Training(_trainer(loaded, anchor, latents, cond, prior, config), key, meta,
                                     TrainingLog(label, config.lam), progress, spec.delta_dtype)
                if spec.resume:
                    training.resume()
            if previewer is not None:
                room = PreviewMemory(between_steps(need, memory.free), weights_resident=anchor.file is None)
                progress.note = previewer.start(loaded.patcher, training.trainer.step_count, config.steps, room)
                training.after_step = previewer
            delta, training_log = training.run()
        note = sampling_note(spec.model, delta.tensors, 1.0, spec.sampling)
        if note:
            progress.text(note)
            log.warning("LipschitzPersonalize: %s", note)
        return patched_model(spec.model, delta.tensors, sampling=spec.sampling), delta, training_log


def _load_finished(key: str, unet, progress: NodeProgress) -> tuple[TrainedDelta, TrainingLog | None] | None:
    """The finished run of this key, if one was saved; a damaged one is moved aside."""
    done = auto_path(key)
    if not done.exists():
        return None
    try:
        delta, saved_log, _ = load_delta_file(done, {n: tuple(p.shape) for n, p in unet.named_parameters()})
    except NodeInputError as exc:  # keep the damaged file aside for inspection, retrain
        aside = done.with_name(done.name + ".corrupt")
        done.replace(aside)
        log.warning("LipschitzPersonalize: %s; moved to %s, training again", exc, aside.name)
        progress.text(f"warning: the saved run {done.name} is damaged ({exc}); moved it to {aside.name} "
                      "and training again")
        return None
    mark_used(done)
    return delta, saved_log


def _trainer(loaded: LoadedUNet, anchor: Anchor, latents: Tensor, cond: Tensor,
             prior: tuple[Tensor, Tensor] | None, config: TrainConfig) -> RegularizedTrainer:
    dev = loaded.device
    data = CachedExamples(latents.to(dev).clone(), cond.to(dev).clone(), config.batch_size)
    prior_data = (CachedExamples(prior[0].to(dev).clone(), prior[1].to(dev).clone(), config.batch_size)
                  if prior is not None else None)
    checkpoint = checkpoint_units(loaded.unet) if config.gradient_checkpointing else ()
    delta = ParameterDelta(loaded.unet, device=dev,
                           dtype=config.delta_torch_dtype,
                           anchor=read_anchor(anchor, loaded.unet, dev))
    return RegularizedTrainer(loaded.eps, delta, alphas_cumprod(loaded.patcher),
                              data, config, prior=prior_data, checkpoint=checkpoint)


def _anchors(spec: RunSpec, node_id: str) -> dict[str, Anchor]:
    """theta0 for each kind of mode (:attr:`trainer.memory.MemoryMode.anchor`): ``checkpoint``,
    the file's values where ComfyUI holds the model narrower; ``model``, the model as held."""
    held = spec.model.model_dtype()
    return {"checkpoint": choose_anchor(spec.model, spec.model.model.diffusion_model, spec.graph, node_id),
            "model": Anchor(held, None, "", "as ComfyUI loaded the model")}


def _memory_plan(spec: RunSpec, memory: TrainingMemory, anchors: dict[str, Anchor]
                 ) -> tuple[str, str, Estimate]:
    """The pre-flight check (:func:`trainer.memory.preflight`), before any work: ``(mode, the
    text that says which mode, why and what the anchor is, the mode's estimate)``."""
    c = spec.config
    needs = {}
    for m in ORDER:
        needs[m] = estimate(m, memory.params, memory.largest, memory.anchor_bytes(anchors[MODES[m].anchor]),
                            c.resolution, c.batch_size, c.gradient_checkpointing, c.precision)
    try:
        mode, why = preflight(spec.memory, memory.free, needs, str(memory.device))
    except ConfigError as exc:
        raise NodeInputError("memory", exc.problem, exc.fix) from None
    anchor = anchors[MODES[mode].anchor]
    return (mode, f"memory: {mode} ({why}); anchor theta0 in {anchor.name} {anchor.why}; {MODES[mode].changes}",
            needs[mode])


class _Training:
    """One training run in ComfyUI's worker thread: resume, relay progress and Cancel, save the outcome."""

    def __init__(self, trainer: RegularizedTrainer, key: str, meta: dict[str, str], training_log: TrainingLog,
                 progress: NodeProgress, delta_dtype: str) -> None:
        self.trainer, self.key, self.meta, self.log, self.progress = trainer, key, meta, training_log, progress
        self.delta_dtype = delta_dtype
        self.partial = partial_path(key)
        self.after_step: Callable[[int], None] = lambda step: None
        """Work between steps once a step is reported (the previews), in the training's thread."""

    def run(self) -> tuple[TrainedDelta, TrainingLog]:
        start_step = self.trainer.step_count
        try:  # in ComfyUI's worker thread: a thread of ours is slower on a CPU (trainer/job.py)
            outcome = job.run(self.trainer, self._relay, comfy.model_management.processing_interrupted)
        except BaseException as exc:  # the node's NodeProgress.running marks the chart's state
            if self.trainer.step_count > start_step:
                saved = self._save(self.partial, stopped(exc))
                log.warning("LipschitzPersonalize: stopped at step %d; saved %s", saved.steps_done, self.partial.name)
            raise
        if outcome.status == "cancelled":
            if outcome.steps_done > start_step:
                self._save(self.partial, "interrupted")
            raise comfy.model_management.InterruptProcessingException()
        if outcome.status == "diverged":
            self._save(self.partial, "diverged")
            self.progress.finish("diverged")
            raise RuntimeError(f"Training diverged: {outcome.message}. The last good delta "
                               f"({outcome.steps_done} steps) was saved as models/lipschitz_deltas/{self.partial.name}.")
        done = auto_path(self.key)
        result = self._save(done, "completed")
        self.partial.unlink(missing_ok=True)
        self.progress.finish("completed")
        evicted = evict_auto(keep=done)
        self.progress.text(f"done: {outcome.steps_done} steps, |delta| {self.log.records[-1].delta_norm:.4f}; "
                           f"saved models/lipschitz_deltas/{done.name} ({gb(done.stat().st_size)})"
                           + (f"; evicted {len(evicted)} older auto-saved run(s), {gb(sum(n for _, n in evicted))}, "
                              "to stay under the cache cap" if evicted else ""))
        return result, self.log

    def resume(self) -> None:
        """Continue the stopped run of this key, if there is one."""
        if not self.partial.exists():
            self.progress.text("resume: no stopped run of these settings was found; training from step 0")
            return
        delta = self.trainer.delta
        try:
            saved, saved_log, extra = load_delta_file(self.partial, {n: tuple(t.shape) for n, t in delta.delta.items()})
            self.trainer.load_state_dict(trainer_state(saved, extra, delta.names))
        except (NodeInputError, KeyError, ValueError, RuntimeError) as exc:
            raise NodeInputError("resume", f"the saved partial run {self.partial.name} cannot be resumed ({exc})",
                                 "Turn resume off to train from step 0 (the file is replaced by the new run)") from exc
        self.log = saved_log or self.log
        self.progress.text(f"resuming at step {self.trainer.step_count} from {self.partial.name}")

    def _relay(self, metrics) -> None:
        self.log.add(metrics)
        self.progress.step(metrics)
        self.after_step(metrics.step)

    def _save(self, path, status: str) -> TrainedDelta:
        """Write the delta in the run's dtype (plus the resume state of a stopped run); the
        returned delta holds exactly the stored values, once."""
        dtype = DELTA_DTYPES[self.delta_dtype]
        result = TrainedDelta(self.trainer.delta.state_dict(dtype),
                              {**self.meta, "steps_done": str(self.trainer.step_count), "status": status})
        self.log.status = status
        if status == "completed":
            save_delta_file(path, result, self.log)
            return result
        moments = moment_format(self.delta_dtype)
        self.progress.text(f"saving the stopped run ({gb(file_nbytes(result, moments))})...")
        save_delta_file(path, result, self.log, self.trainer.state_dict(with_delta=False), moments)
        self.progress.text(f"saved the stopped run as models/lipschitz_deltas/{path.name} "
                           f"({gb(path.stat().st_size)}); turn resume on to continue it")
        return result
