"""One benchmark job, (subject, lambda): train, sample the evaluation and drift images, score them.

The same function runs in-process and as a Ray task.  The model, the encoders and the base
model's drift images are cached per process (a Ray worker runs many jobs), keyed by what
defines them.  Scores come from :mod:`trainer.evaluation` only, the module the metric nodes use.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lipschitz_personalize.trainer.config import TrainConfig
from lipschitz_personalize.trainer.evaluation.encoders import load_encoder
from lipschitz_personalize.trainer.evaluation.scores import drift, inception_fid, prompt_fidelity, strip_token, subject_fidelity

from . import protocol
from .diffusers_host import DiffusersSD15, load_sd15
from .train import personalize


@dataclass(frozen=True)
class Settings:
    """Everything a job needs (plain values: it travels to Ray workers).  Defaults: the paper."""

    model: str
    data: str
    out: str
    clip: str
    dino: str
    config: str | None = None
    tokenizer_dir: str | None = None
    steps: int = 1000
    lr: float = 2e-6
    seed: int = 2025
    resolution: int = 512
    prompts: int = 25
    images_per_prompt: int = 4
    sample_steps: int = 50
    cfg: float = 7.5
    drift_classes: int = 20
    drift_images: int = 4
    drift_prompts: str | None = None
    """A text file of drift prompts, one a line (default: ImageNet class names)."""
    sample_batch: int = 8
    """Images sampled at once: a memory knob (each image's noise is its own)."""
    device: str = "auto"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class Job:
    subject: str
    lam: float

    @property
    def key(self) -> str:
        return f"{self.subject}__lambda{self.lam:g}"


StepBar = Callable[[str, int], Any]
"""``(description, total) -> a tqdm-like bar`` (``update``, ``set_description``, ``close``: also
Ray's ``tqdm_ray``)."""

_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def jobs_dir(out: str | Path) -> Path:
    return Path(out) / "jobs"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class RunningRecord:
    """``<key>.running``: which process runs the job (pid, host), which try this is, and its
    last training step, so an operator (or a test) can see where each job is."""

    def __init__(self, settings: Settings, job: Job) -> None:
        self.path = jobs_dir(settings.out) / f"{job.key}.running"
        try:
            self.attempt = json.loads(self.path.read_text())["attempt"] + 1
        except (OSError, ValueError, KeyError):
            self.attempt = 1
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "attempt": self.attempt,
                       "started": time.time(), "step": 0}
        write_json(self.path, self.record)

    def step(self, step: int) -> None:
        self.record["step"] = step
        write_json(self.path, self.record)


def run_job(settings: Settings, job: Job, step_bar: StepBar) -> dict[str, Any]:
    """Train ``job`` and score it: one ``results.csv`` row."""
    running = RunningRecord(settings, job)
    device = settings.torch_device()
    bench = _cached(("data", settings.data), lambda: protocol.read_benchmark(settings.data))
    subject = bench.subjects[job.subject]
    model: DiffusersSD15 = _cached(("model", settings.model, settings.config, str(device)),
                                   lambda: load_sd15(settings.model, config=settings.config, device=device))
    photos = protocol.load_photos(subject.photos(), settings.resolution)  # training data, DINO/CLIP-I references
    config = TrainConfig(steps=settings.steps, lr=settings.lr, lam=job.lam, seed=settings.seed,
                         resolution=settings.resolution)
    desc = f"{job.key} train"
    bar = step_bar(desc, settings.steps)
    started = time.perf_counter()
    try:
        trainer = personalize(model, photos, subject.instance_prompt, config,
                              on_step=lambda m: (bar.set_description(f"{desc} total loss {m.loss:.4f}"), bar.update(1),
                                                 running.step(m.step)))
    finally:
        bar.close()
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    sample = dict(steps=settings.sample_steps, cfg=settings.cfg, size=settings.resolution,
                  batch=settings.sample_batch)
    prompts, seeds = protocol.expand(bench.prompts(subject, settings.prompts), settings.images_per_prompt)
    generated = model.generate(prompts, seeds, weights=trainer.delta.applied, **sample)
    drift_list = protocol.drift_prompts(settings.drift_classes, settings.drift_prompts)
    drift_prompts, drift_seeds = protocol.expand(drift_list, settings.drift_images)
    base = _cached(("base", settings.model, settings.config, str(device), tuple(drift_prompts), tuple(drift_seeds),
                    *sample.values()), lambda: model.generate(drift_prompts, drift_seeds, **sample))
    personalized = model.generate(drift_prompts, drift_seeds, weights=trainer.delta.applied, **sample)
    sample_seconds = time.perf_counter() - started
    del trainer

    clip = load_encoder(settings.clip, tokenizer_dir=settings.tokenizer_dir, device=device)
    dino = load_encoder(settings.dino, device=device)
    clip_gen = clip.embed_images(generated)
    shift = drift(clip.embed_images(base), clip.embed_images(personalized))
    fid = inception_fid(base, personalized)
    return {
        "subject": job.subject, "lambda": job.lam,
        "dino": subject_fidelity(dino.embed_images(generated), dino.embed_images(photos)).mean,
        "clip_i": subject_fidelity(clip_gen, clip.embed_images(photos)).mean,
        "clip_t": prompt_fidelity(clip_gen, clip.embed_texts([strip_token(p, protocol.TOKEN) for p in prompts])).mean,
        "drift_fd": shift.frechet, "drift_kid": shift.kid, "drift_cos": shift.paired_cosine,
        "drift_fid_inception": "" if fid is None else fid,
        "train_seconds": round(train_seconds, 2), "sample_seconds": round(sample_seconds, 2),
        "steps": settings.steps, "images": len(prompts), "drift_images": len(drift_prompts), "attempt": running.attempt,
        "class": subject.class_name, "device": str(device), "clip_encoder": clip.name, "dino_encoder": dino.name,
    }
