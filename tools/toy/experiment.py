"""The toy experiment: pre-train on the base classes, fine-tune on the new one for every
setting (lambdas, the DreamBooth-style baseline, ``sum_sq`` at matched strength), per seed, in a
process pool; and the summary over seeds that ``toy.json`` holds.

Pre-training trains a delta on a freshly initialised model (``lambda = 0``) and folds it into a
copy of that model, which is then the anchor ``theta0`` of the fine-tunes.  The fine-tunes
continue the pre-training Adam state (moments and step count), as the reference script
continues its optimizer.
"""
from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from lipschitz_personalize.trainer.config import TrainConfig
from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer.loop import RegularizedTrainer
from lipschitz_personalize.trainer.memory import MODES, configure

from .data import (BATCH, DEFAULT_SEED, FINETUNE_SEED, HIT_RADIUS, MODEL_SEED, N_BASE, NEW_CLASS, POINTS_PER_CLASS,
                   PRETRAIN_SEED, EpochBatches, make_points, rng_seed)
from .figure import draw_figure
from .model import T, ToyEpsModel, alphas_cumprod, cosine_betas, matched_sum_sq_scale, parameter_shapes
from .sampler import evaluate

LR = 2e-3
DREAMBOOTH_PRIOR_WEIGHT = 100.0
DEFAULT_LAMBDAS: tuple[float, ...] = (0.0, 1.0, 50.0, 100.0, 1000.0, 10000.0)


@dataclass(frozen=True)
class ToyConfig:
    """One toy experiment.  The defaults are the paper's schedule and sweep on seed 0.

    ``compare_sum_sq``: ``mean_sq`` lambdas (> 0) also fine-tuned with the plain sum of squares as
    ``L_lip``, at ``lambda * sum_sq_scale`` (default :func:`~.model.matched_sum_sq_scale`, the same
    overall strength).  ``memory``: a memory mode of the node (``trainer.memory``) for the
    fine-tunes instead of the paper's defaults.  ``continue_optimizer``: the fine-tunes continue
    pre-training's Adam state (the reference script's), else a fresh Adam.
    """

    seeds: tuple[int, ...] = (DEFAULT_SEED,)
    pretrain_epochs: int = 1000
    finetune_epochs: int = 5000
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    dreambooth: bool = True
    compare_sum_sq: tuple[float, ...] = ()
    sum_sq_scale: float | None = None
    samples_per_class: int = 1000
    continue_optimizer: bool = True
    memory: str | None = None


@dataclass
class Setting:
    name: str
    lam: float
    prior_weight: float = 0.0  # > 0: DreamBooth-style, class-0 data as the prior term
    regularizer: str = "mean_sq"  # the kind of L_lip (trainer.config.REGULARIZERS)
    nominal_lam: float | None = None  # sum_sq comparison: the mean_sq lambda this one is matched to

    @property
    def label(self) -> str:
        if self.name == "pretrained":
            return "pretrained"
        if self.prior_weight > 0:
            return f"DreamBooth (class 0 x{self.prior_weight:g})"
        if self.regularizer != "mean_sq":
            nominal = f" (~ mean_sq {self.nominal_lam:g})" if self.nominal_lam is not None else ""
            return f"{self.regularizer} lambda = {self.lam:.3g}{nominal}"
        return f"lambda = {self.lam:g}"


def settings_for(lambdas: Sequence[float], dreambooth: bool = True) -> list[Setting]:
    out = [Setting(f"lambda_{lam:g}", float(lam)) for lam in lambdas]
    if dreambooth:
        out.append(Setting("dreambooth", 0.0, DREAMBOOTH_PRIOR_WEIGHT))
    return out


def sum_sq_settings(lambdas: Sequence[float], scale: float) -> list[Setting]:
    """``sum_sq`` fine-tunes at ``lambda * scale`` for each ``mean_sq`` lambda > 0 given."""
    return [Setting(f"sum_sq_lambda_{lam:g}", float(lam) * scale, regularizer="sum_sq", nominal_lam=float(lam))
            for lam in lambdas if lam > 0]


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def _pretrain_task(
    epochs: int, seed: int, samples_per_class: int, threads: int = 1
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any], Tensor, Tensor]:
    """One seed's pre-training and its evaluation, as a worker task.

    Returns (pretrained state_dict, Adam state, metrics, samples, labels); the metrics'
    ``adaptation`` is the untrained baseline (class 5's embedding is still its initialisation).
    """
    _set_threads(threads)
    state, adam_state, seconds = _pretrain(epochs, make_points(seed), seed)
    model = ToyEpsModel()
    model.load_state_dict(state)
    metrics, x, labels = evaluate(model, samples_per_class, seed)
    metrics.update(label="pretrained", lam=None, prior_weight=0.0, regularizer=None, nominal_lam=None,
                   delta_norm=0.0, steps=epochs * math.ceil(N_BASE * POINTS_PER_CLASS / BATCH), seconds=seconds)
    return state, adam_state, metrics, x, labels


def _pretrain(epochs: int, points: tuple[Tensor, Tensor], seed: int = DEFAULT_SEED) -> tuple[dict[str, Tensor], dict[str, Any], float]:
    """Pre-train on the five base classes; returns (pretrained state_dict, Adam state, seconds)."""
    start = time.perf_counter()
    torch.manual_seed(rng_seed(seed, MODEL_SEED))
    model = ToyEpsModel().requires_grad_(False)
    x, labels = points
    base = labels < N_BASE
    data = EpochBatches(x[base], labels[base])
    delta = ParameterDelta(model)
    config = TrainConfig(steps=epochs * data.batches_per_epoch, lr=LR, lam=0.0, seed=rng_seed(seed, PRETRAIN_SEED))
    trainer = RegularizedTrainer(model, delta, alphas_cumprod(cosine_betas()), data, config)
    for _ in range(config.steps):
        trainer.step()
    with torch.no_grad():
        state = {name: (p + delta.delta[name]).detach().clone() for name, p in model.named_parameters()}
    return state, trainer.update.state_dict(), time.perf_counter() - start


def _finetune(
    setting: Setting,
    epochs: int,
    pretrained: dict[str, Tensor],
    adam_state: dict[str, Any] | None,
    points: tuple[Tensor, Tensor],
    samples_per_class: int,
    seed: int = DEFAULT_SEED,
    memory: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """One fine-tune from the pre-trained weights; returns its metrics and samples.

    ``memory``: a memory mode of :mod:`trainer.memory` (its optimizer state and delta, and for
    the ``12gb``/``8gb`` modes the anchor stored in fp16 as ComfyUI stores SD1.5 on a GPU)."""
    _set_threads(threads)
    start = time.perf_counter()
    model = ToyEpsModel()
    model.load_state_dict(pretrained)
    model.requires_grad_(False)
    if memory is not None and MODES[memory].anchor == "model":
        model.half()
    x, labels = points
    new = labels == NEW_CLASS
    data = EpochBatches(x[new], labels[new])
    prior = None
    if setting.prior_weight > 0:
        zero = labels == 0
        prior = EpochBatches(x[zero], labels[zero])
    config = TrainConfig(
        steps=epochs * data.batches_per_epoch,
        lr=LR,
        lam=setting.lam,
        seed=rng_seed(seed, FINETUNE_SEED),
        prior_weight=setting.prior_weight if prior is not None else 1.0,
        regularizer=setting.regularizer,
    )
    if memory is not None:
        config = configure(config, memory)
    delta = ParameterDelta(model, dtype=config.delta_torch_dtype)
    trainer = RegularizedTrainer(model, delta, alphas_cumprod(cosine_betas()), data, config, prior=prior)
    if adam_state is not None:
        # Optimizer.load_state_dict keeps the given tensors when no cast is needed, and Adam
        # updates them in place; across worker processes the tensors arrive in shared memory
        # (torch's pickler), so without this copy concurrent fine-tunes race on one state.
        trainer.update.load_state_dict(copy.deepcopy(adam_state))
    metrics = None
    for _ in range(config.steps):
        metrics = trainer.step()
    seconds = time.perf_counter() - start
    with delta.applied():
        result, samples, sample_labels = evaluate(model, samples_per_class, seed)
    result.update(
        label=setting.label,
        lam=setting.lam,
        prior_weight=setting.prior_weight,
        regularizer=setting.regularizer,
        nominal_lam=setting.nominal_lam,
        delta_norm=float(torch.stack([d.detach().double().norm() for d in delta.tensors()]).norm()),
        delta_norms={name: float(d.detach().double().norm()) for name, d in delta.delta.items()},
        final_denoise=metrics.denoise if metrics else None,
        steps=config.steps,
        seconds=seconds,
    )
    return {"name": setting.name, "metrics": result, "samples": samples, "labels": sample_labels}



def run_toy(config: ToyConfig = ToyConfig(), out_dir: str | os.PathLike[str] | None = None,
            workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Pre-train, fine-tune every setting, evaluate, per seed; write ``toy.json``/``toy.png``
    into ``out_dir`` when given.

    Each seed is an independent run: it re-draws the data, the initialisation, the batches, the
    noise and the samples, pre-trains once and fine-tunes every setting from that pre-training.
    Every pre-training and fine-tune is a task for ``workers`` processes (default
    ``min(2, cores)``, one thread each); every random draw is seeded, so the numbers depend
    neither on the worker count, nor on the other seeds run, nor on the order tasks finish in.
    ``progress`` prints a line to stderr as each task finishes.

    Returns the JSON's content: ``per_seed[seed]["settings"]`` maps a setting's name
    (``pretrained``, ``lambda_<lam>``, ``dreambooth``, ``sum_sq_lambda_<lam>``) to its metrics,
    ``summary`` holds each metric's median and worst over the seeds, and ``settings`` is the
    first seed's (the figure's) for single-seed readers.
    """
    start = time.perf_counter()
    seed_list = list(config.seeds)
    if not seed_list or len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
        raise ValueError(f"seeds must be distinct numbers >= 0, at least one: {config.seeds!r}")
    cores = os.cpu_count() or 1
    workers = max(1, workers if workers is not None else min(2, cores))
    scale = matched_sum_sq_scale() if config.sum_sq_scale is None else float(config.sum_sq_scale)
    settings = settings_for(config.lambdas, config.dreambooth)
    extra = sum_sq_settings(config.compare_sum_sq, scale)
    all_settings = settings + extra
    if len({s.name for s in all_settings}) != len(all_settings):
        raise ValueError("two settings share a name (a lambda given twice?)")
    figure_seed = seed_list[0]
    # Longest first (the DreamBooth baseline runs two forwards a step) to balance the workers.
    finetune_order = sorted(all_settings, key=lambda s: s.prior_weight > 0, reverse=True)

    pre: dict[int, tuple[dict[str, Any], Tensor, Tensor]] = {}
    fine: dict[tuple[int, str], dict[str, Any]] = {}
    n_tasks = len(seed_list) * (1 + len(all_settings))

    def report_progress(what: str) -> None:
        if progress:
            done = len(pre) + len(fine)
            print(f"[toy] {done}/{n_tasks} {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    def finetune_args(seed_: int, state: dict[str, Tensor], adam_state: dict[str, Any]) -> list[tuple]:
        points = make_points(seed_)
        return [(s, config.finetune_epochs, state, adam_state if config.continue_optimizer else None, points,
                 config.samples_per_class, seed_, config.memory) for s in finetune_order]

    previous_threads = torch.get_num_threads()
    # One intra-op thread per process: for a 96-wide MLP on 512 points, more threads only add
    # synchronisation (measured ~10x slower with 2 threads on a 2-core machine).
    _set_threads(1)
    try:
        if workers == 1:
            for sd in seed_list:
                state, adam_state, metrics, x, labels = _pretrain_task(config.pretrain_epochs, sd, config.samples_per_class)
                pre[sd] = (metrics, x, labels)
                report_progress(f"seed {sd} pretrained")
                for a in finetune_args(sd, state, adam_state):
                    fine[(sd, a[0].name)] = _finetune(*a)
                    report_progress(f"seed {sd} {a[0].name}")
        else:
            # Spawned (not forked: the parent's OpenMP state does not survive a fork).  All
            # pre-trainings are queued first; each one's fine-tunes are queued as it finishes,
            # so both workers stay busy across seeds.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_set_threads,
                                     initargs=(1,)) as pool:
                pending = {pool.submit(_pretrain_task, config.pretrain_epochs, sd, config.samples_per_class): ("pre", sd, None)
                           for sd in seed_list}
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            kind, sd, name = pending.pop(fut)
                            if kind == "pre":
                                state, adam_state, metrics, x, labels = fut.result()
                                pre[sd] = (metrics, x, labels)
                                report_progress(f"seed {sd} pretrained")
                                for a in finetune_args(sd, state, adam_state):
                                    pending[pool.submit(_finetune, *a)] = ("fine", sd, a[0].name)
                            else:
                                fine[(sd, name)] = fut.result()
                                report_progress(f"seed {sd} {name}")
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        _set_threads(previous_threads)

    order = [s.name for s in all_settings]
    per_seed: dict[str, Any] = {}
    for sd in seed_list:
        settings_out = {"pretrained": pre[sd][0], **{name: fine[(sd, name)]["metrics"] for name in order}}
        per_seed[str(sd)] = {"settings": settings_out}
    report: dict[str, Any] = {
        "config": {
            "pretrain_epochs": config.pretrain_epochs,
            "finetune_epochs": config.finetune_epochs,
            "lambdas": [float(v) for v in config.lambdas],
            "regularizer": "mean_sq",
            "memory": config.memory,
            "dreambooth_prior_weight": DREAMBOOTH_PRIOR_WEIGHT if config.dreambooth else None,
            "sum_sq_comparison": None if not extra else {
                "mean_sq_lambdas": [s.nominal_lam for s in extra],
                "sum_sq_lambdas": [s.lam for s in extra],
                "scale": scale,
                "matched_scale": matched_sum_sq_scale(),
                "rule": "lambda_sum_sq = lambda_mean_sq * tensors / parameters (equal total weight; "
                        "see tools.toy.model.matched_sum_sq_scale)",
                "parameter_shapes": {k: list(v) for k, v in parameter_shapes().items()},
            },
            "samples_per_class": config.samples_per_class,
            "hit_radius": HIT_RADIUS,
            "batch_size": BATCH,
            "lr": LR,
            "T": T,
            "continue_optimizer": config.continue_optimizer,
            "workers": workers,
            "seeds": seed_list,
            "figure_seed": figure_seed,
        },
        # The figure's seed, in the single-seed layout (what readers of one run look at).
        "settings": per_seed[str(figure_seed)]["settings"],
        "per_seed": per_seed,
        "summary": summarize(per_seed),
    }
    report["total_seconds"] = time.perf_counter() - start
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _, pre_x, pre_labels = pre[figure_seed]
        base = pre_labels < N_BASE  # class 5's embedding is untrained before fine-tuning
        panels = [(f"pretrained (seed {figure_seed})", pre_x[base], pre_labels[base])]
        panels += [(fine[(figure_seed, s.name)]["metrics"]["label"], fine[(figure_seed, s.name)]["samples"],
                    fine[(figure_seed, s.name)]["labels"]) for s in settings]
        draw_figure(panels, out / "toy.png")
        report["total_seconds"] = time.perf_counter() - start
        (out / "toy.json").write_text(json.dumps(report, indent=2) + "\n")
    return report



SUMMARY_METRICS = ("preservation_mean", "preservation_min", "adaptation", "adaptation_gain")
"""Higher is better for each; ``worst`` is the minimum over seeds.  ``adaptation_gain`` is a
setting's adaptation minus the same seed's pre-trained (untrained) adaptation."""


def summarize(per_seed: dict[str, Any]) -> dict[str, Any]:
    """Per setting: the median and the worst (minimum) over seeds of each summary metric,
    the median and maximum of ``||delta||``, and the per-seed values they come from."""
    seeds = list(per_seed)
    names = list(per_seed[seeds[0]]["settings"])
    out: dict[str, Any] = {}
    for name in names:
        rows = [per_seed[sd]["settings"][name] for sd in seeds]
        baselines = [per_seed[sd]["settings"]["pretrained"]["adaptation"] for sd in seeds]
        values = {
            "preservation_mean": [r["preservation_mean"] for r in rows],
            "preservation_min": [r["preservation_min"] for r in rows],
            "adaptation": [r["adaptation"] for r in rows],
            "adaptation_gain": [r["adaptation"] - b for r, b in zip(rows, baselines)],
            "preservation_class0": [r["preservation"]["0"] for r in rows],
        }
        entry: dict[str, Any] = {
            "label": rows[0]["label"], "lam": rows[0]["lam"], "regularizer": rows[0].get("regularizer"),
            "nominal_lam": rows[0].get("nominal_lam"), "prior_weight": rows[0]["prior_weight"], "seeds": seeds,
        }
        for key, vals in values.items():
            entry[key] = {"median": statistics.median(vals), "worst": min(vals), "per_seed": vals}
        norms = [r["delta_norm"] for r in rows]
        entry["delta_norm"] = {"median": statistics.median(norms), "max": max(norms), "per_seed": norms}
        out[name] = entry
    return out
