"""The paper's 2-D toy experiment (section 4.3, appendix C and F, Fig. 14), on the real trainer.

Five base classes of 2-D Gaussians (std 0.5) sit on the vertices of a regular pentagon of
radius 3; a conditional eps-predicting MLP is pre-trained on them, then fine-tuned on a new
class 5 at the origin under ``L_denoise + lambda * L_lip`` for several ``lambda``, and under a
DreamBooth-style objective (``lambda = 0``, class-0 data as a prior term with weight 100).
Pre-training and every fine-tune run through :class:`trainer.loop.RegularizedTrainer` with a
:class:`trainer.delta.ParameterDelta` - the very step the SD1.5 trainer takes - so the toy
checks the shipped objective, not a re-implementation of it.  Pre-training trains a delta on
a freshly initialised model (``lambda = 0``) and folds it into a copy of that model, which is
then the anchor ``theta0`` of the fine-tunes.  The fine-tunes continue the pre-training Adam
state (moments and step count), as the reference script continues its optimizer.

For every setting we sample 1000 points per class with ancestral DDPM (final weights
``theta0 + delta`` inside ``delta.applied()``) and report

* ``preservation[c]``: fraction of class-``c`` samples within 1.5 of class ``c``'s centre,
  for the base classes ``c = 0..4``, and their mean and minimum;
* ``adaptation``: fraction of class-5 samples within 1.5 of the origin (for the pre-trained
  model, whose class-5 embedding is still at its initialisation, a before-fine-tuning baseline);
* ``delta_norm``: ``||theta - theta0||`` over all parameters (``delta_norms``: per tensor);
  ``seconds`` of fine-tuning.

``python -m trainer.toy --seeds 0-7 --out DIR`` (seeds also as ``0,3,5`` or one number;
default 0) runs the experiment once per seed - each seed re-draws the data, the
initialisation, the batches, the noise and the samples, pre-trains once and fine-tunes every
setting from that pre-training - and writes ``DIR/toy.json`` (every seed's metrics under
``per_seed``, per setting the median and the worst over the seeds under ``summary``, the first
seed's metrics under ``settings``) and ``DIR/toy.png`` (the first seed: one scatter panel per
setting plus the pre-trained model, drawn with Pillow).  :func:`markdown_table` renders the
summary for the README.  ``--compare-sum-sq 50 1000`` adds fine-tunes with the plain sum of
squares as ``L_lip``, at lambdas rescaled to the same overall strength
(:func:`matched_sum_sq_scale`); the default objective stays the paper's ``mean_sq``.  Every
pre-training and fine-tune is a task for a pool of worker processes (one thread each), and
every random draw is seeded, so the numbers depend neither on the worker count nor on the
other seeds run.
"""
from __future__ import annotations

import argparse
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
from torch import Tensor, nn

from .delta import ParameterDelta
from .config import TrainConfig
from .loop import RegularizedTrainer
from .memory import MODES, ORDER, configure

N_BASE = 5
NEW_CLASS = 5
N_CLASSES = 6
POINTS_PER_CLASS = 1000
STD = 0.5
RADIUS = 3.0
T = 100
BATCH = 512
LR = 2e-3
HIT_RADIUS = 1.5
DREAMBOOTH_PRIOR_WEIGHT = 100.0
DEFAULT_LAMBDAS: tuple[float, ...] = (0.0, 1.0, 50.0, 100.0, 1000.0, 10000.0)
DEFAULT_SEED = 0
# Offsets from the run's seed of the independent random streams.
DATA_SEED, MODEL_SEED, PRETRAIN_SEED, FINETUNE_SEED, SAMPLE_SEED = 0, 1, 2, 3, 4


def _rng_seed(seed: int, stream: int) -> int:
    return 1000 * seed + stream

# One colour per class (0..4 the base classes, 5 the new one), as RGB.
COLOURS = [(31, 60, 160), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (0, 0, 0)]


# -- data, schedule, model -----------------------------------------------------------------
def centres() -> Tensor:
    """``(6, 2)``: the pentagon's vertices (class 0 on top, counter-clockwise), then the origin."""
    angles = torch.arange(N_BASE, dtype=torch.float64) * (2 * math.pi / N_BASE) + math.pi / 2
    base = RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return torch.cat([base, torch.zeros(1, 2, dtype=torch.float64)]).float()


def make_points(seed: int = DEFAULT_SEED) -> tuple[Tensor, Tensor]:
    """1000 points per class for all six classes: ``x (6000, 2)``, ``labels (6000,)``."""
    g = torch.Generator().manual_seed(_rng_seed(seed, DATA_SEED))
    labels = torch.arange(N_CLASSES).repeat_interleave(POINTS_PER_CLASS)
    x = centres()[labels] + STD * torch.randn(labels.numel(), 2, generator=g)
    return x, labels


def cosine_betas(steps: int = T, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: ``beta_t = 1 - abar(t+1)/abar(t)``, clipped at 0.999."""
    ts = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((ts + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


def alphas_cumprod(betas: Tensor) -> Tensor:
    return torch.cumprod(1 - betas, dim=0)


class ToyEpsModel(nn.Module):
    """``eps_theta(x_t, t, c)``: class and time embeddings concatenated to the point, 2 hidden layers."""

    def __init__(self, hidden: int = 96, emb: int = 8) -> None:
        super().__init__()
        self.class_emb = nn.Embedding(N_CLASSES, emb)
        self.time_emb = nn.Embedding(T, emb)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * emb, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.net(torch.cat([x, self.class_emb(c), self.time_emb(t)], dim=1))


class EpochBatches:
    """A :class:`~trainer.loop.DataSource` that walks shuffled epochs in batches (last one short).

    Each epoch is a fresh permutation drawn from the trainer's generator, so ``steps =
    epochs * ceil(n / batch_size)`` trainer steps are exactly ``epochs`` passes over the data.
    """

    def __init__(self, x0: Tensor, cond: Tensor, batch_size: int = BATCH) -> None:
        if x0.shape[0] == 0 or x0.shape[0] != cond.shape[0]:
            raise ValueError("need as many conditions as (at least one) examples")
        self.x0, self.cond, self.batch_size = x0, cond, batch_size
        self._batches: list[Tensor] = []

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.x0.shape[0] / self.batch_size)

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if not self._batches:
            perm = torch.randperm(self.x0.shape[0], generator=generator)
            self._batches = list(perm.split(self.batch_size))
        idx = self._batches.pop(0)
        return self.x0[idx], self.cond[idx]


@torch.no_grad()
def ddpm_sample(model_fn, labels: Tensor, betas: Tensor, generator: torch.Generator) -> Tensor:
    """Ancestral DDPM sampling (``sigma_t^2 = beta_t``) of one point per entry of ``labels``."""
    betas = betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    x = torch.randn(labels.numel(), 2, generator=generator)
    for t in range(betas.numel() - 1, -1, -1):
        tt = torch.full((labels.numel(),), t, dtype=torch.long)
        eps = model_fn(x, tt, labels)
        coef = float(betas[t] / (1 - abar[t]).sqrt())
        x = (x - coef * eps) / float(alphas[t].sqrt())
        if t > 0:
            x = x + float(betas[t].sqrt()) * torch.randn(x.shape, generator=generator)
    return x


# -- one setting ---------------------------------------------------------------------------
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


def parameter_shapes() -> dict[str, tuple[int, ...]]:
    """The toy model's parameter tensors and their shapes (what ``L_lip`` sums over)."""
    return {name: tuple(p.shape) for name, p in ToyEpsModel().named_parameters()}


def matched_sum_sq_scale() -> float:
    """``lambda_sum_sq / lambda_mean_sq`` at equal overall strength: tensors / parameters.

    ``mean_sq`` weighs an element of tensor ``i`` by ``1 / n_i``, ``sum_sq`` weighs every element
    by 1.  Averaged over all ``N`` elements, ``mean_sq``'s weight is ``(number of tensors) / N``,
    so ``lambda_sum = lambda_mean * tensors / N`` gives both the same ``lambda * L_lip`` for a
    delta whose squared entries are spread evenly over all parameters (and the same total
    weight ``sum_elements lambda * w``); only how that weight is split between tensors differs.
    For the toy: 8 tensors, 12178 parameters, scale 1/1522.
    """
    shapes = parameter_shapes()
    return len(shapes) / sum(math.prod(s) for s in shapes.values())


def sum_sq_settings(lambdas: Sequence[float], scale: float) -> list[Setting]:
    """``sum_sq`` fine-tunes at ``lambda * scale`` for each ``mean_sq`` lambda > 0 given."""
    return [Setting(f"sum_sq_lambda_{lam:g}", float(lam) * scale, regularizer="sum_sq", nominal_lam=float(lam))
            for lam in lambdas if lam > 0]


def evaluate(model_fn, samples_per_class: int, seed: int = DEFAULT_SEED) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Sample every class and score preservation and adaptation; returns (metrics, x, labels)."""
    labels = torch.arange(N_CLASSES).repeat_interleave(samples_per_class)
    g = torch.Generator().manual_seed(_rng_seed(seed, SAMPLE_SEED))
    x = ddpm_sample(model_fn, labels, cosine_betas(), g).float()
    hit = (x - centres()[labels]).norm(dim=1) <= HIT_RADIUS
    per_class = hit.float().reshape(N_CLASSES, samples_per_class).mean(dim=1).tolist()
    preservation = {str(c): per_class[c] for c in range(N_BASE)}
    metrics = {
        "preservation": preservation,
        "preservation_mean": sum(per_class[:N_BASE]) / N_BASE,
        "preservation_min": min(per_class[:N_BASE]),
        "adaptation": per_class[NEW_CLASS],
    }
    return metrics, x, labels


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
    torch.manual_seed(_rng_seed(seed, MODEL_SEED))
    model = ToyEpsModel().requires_grad_(False)
    x, labels = points
    base = labels < N_BASE
    data = EpochBatches(x[base], labels[base])
    delta = ParameterDelta(model)
    config = TrainConfig(steps=epochs * data.batches_per_epoch, lr=LR, lam=0.0, seed=_rng_seed(seed, PRETRAIN_SEED))
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
        seed=_rng_seed(seed, FINETUNE_SEED),
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


# -- the figure ----------------------------------------------------------------------------
def draw_figure(panels: Sequence[tuple[str, Tensor, Tensor]], path: Path, extent: float = 5.0) -> None:
    """Scatter panels in a grid, shared axes ``[-extent, extent]^2``, one colour per class."""
    from PIL import Image, ImageDraw, ImageFont

    size, margin, title_h, cols = 300, 30, 28, 4
    rows = math.ceil(len(panels) / cols)
    legend_h = 34
    width = cols * (size + 2 * margin)
    height = rows * (size + 2 * margin + title_h) + legend_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=15)
        small = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()

    def to_px(ox: int, oy: int, px: float, py: float) -> tuple[float, float]:
        return ox + (px + extent) / (2 * extent) * size, oy + (extent - py) / (2 * extent) * size

    for k, (title, xs, labels) in enumerate(panels):
        r, c = divmod(k, cols)
        ox = c * (size + 2 * margin) + margin
        oy = r * (size + 2 * margin + title_h) + title_h + margin // 2
        draw.text((ox + size / 2, oy - 6), title, fill="black", font=font, anchor="md")
        for tick in range(-int(extent), int(extent) + 1, 2 if extent > 3 else 1):
            tx, ty = to_px(ox, oy, tick, -extent)
            draw.line([(tx, ty), (tx, ty + 4)], fill="black")
            draw.text((tx, ty + 5), str(tick), fill="black", font=small, anchor="mt")
            lx, ly = to_px(ox, oy, -extent, tick)
            draw.line([(lx - 4, ly), (lx, ly)], fill="black")
            draw.text((lx - 6, ly), str(tick), fill="black", font=small, anchor="rm")
        for cx, cy in centres().tolist():
            px, py = to_px(ox, oy, cx, cy)
            draw.ellipse([px - HIT_RADIUS / (2 * extent) * size, py - HIT_RADIUS / (2 * extent) * size,
                          px + HIT_RADIUS / (2 * extent) * size, py + HIT_RADIUS / (2 * extent) * size],
                         outline=(200, 200, 200))
        for (px, py), lab in zip(xs.tolist(), labels.tolist()):
            if abs(px) > extent or abs(py) > extent:
                continue
            qx, qy = to_px(ox, oy, px, py)
            draw.rectangle([qx - 1, qy - 1, qx, qy], fill=COLOURS[lab])
        draw.rectangle([ox, oy, ox + size, oy + size], outline="black")
    ly = height - legend_h // 2
    for cls, colour in enumerate(COLOURS):
        lx = margin + cls * 130
        draw.rectangle([lx, ly - 5, lx + 10, ly + 5], fill=colour)
        name = f"class {cls}" + (" (new)" if cls == NEW_CLASS else "")
        draw.text((lx + 16, ly), name, fill="black", font=font, anchor="lm")
    draw.text((width - margin, ly), f"circles: radius {HIT_RADIUS:g} around the class centres",
              fill="black", font=small, anchor="rm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# -- the whole experiment ------------------------------------------------------------------
def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"0-7"``, ``"0,3,5"``, ``"4"``, ``"0-3,8"`` (or ints) -> a list of distinct seeds, in order."""
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return list(dict.fromkeys(int(v) for v in text))
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty seed in {text!r}")
        lo, sep, hi = part.partition("-")
        if sep:
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"seed range {part!r} runs backwards")
            seeds.extend(range(a, b + 1))
        else:
            seeds.append(int(part))
    if any(v < 0 for v in seeds):
        raise ValueError(f"seeds must be >= 0: {text!r}")
    return list(dict.fromkeys(seeds))


def run_toy(
    out_dir: str | os.PathLike[str] | None,
    pretrain_epochs: int = 1000,
    finetune_epochs: int = 5000,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    dreambooth: bool = True,
    samples_per_class: int = 1000,
    workers: int | None = None,
    continue_optimizer: bool = True,
    seed: int | None = None,
    seeds: str | Sequence[int] | None = None,
    compare_sum_sq: Sequence[float] | None = None,
    sum_sq_scale: float | None = None,
    memory: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Pre-train, fine-tune every setting, evaluate, per seed; write ``toy.json``/``toy.png``.

    ``seeds`` (a list or ``"0-7"``-style text; default ``[seed]``, i.e. ``[0]``) are independent
    runs: each seed re-draws the data, the initialisation, the batches, the noise and the
    samples, pre-trains once and fine-tunes every setting from that pre-training.
    ``compare_sum_sq`` adds ``sum_sq`` fine-tunes at ``lambda * sum_sq_scale`` for each of these
    ``mean_sq`` lambdas (> 0); the scale defaults to :func:`matched_sum_sq_scale`.
    ``memory`` runs the fine-tunes in that memory mode (:mod:`trainer.memory`).
    ``progress`` prints a line to stderr as each task finishes.

    Returns the JSON's content: ``per_seed[seed]["settings"]`` maps a setting's name
    (``pretrained``, ``lambda_<lam>``, ``dreambooth``, ``sum_sq_lambda_<lam>``) to its
    metrics, ``summary`` holds each metric's median and worst over the seeds, and
    ``settings`` is the first seed's (the figure's) for single-seed readers.  Every pre-training
    and fine-tune is a task for ``workers`` processes (one thread each); every random draw is
    seeded, so the numbers do not depend on the worker count or the order the tasks finish in.
    """
    start = time.perf_counter()
    if seeds is None:
        seed_list = [DEFAULT_SEED if seed is None else int(seed)]
    else:
        if seed is not None:
            raise ValueError("give seed or seeds, not both")
        seed_list = parse_seeds(seeds)
    if not seed_list:
        raise ValueError("no seed given")
    cores = os.cpu_count() or 1
    workers = max(1, workers if workers is not None else min(2, cores))
    scale = matched_sum_sq_scale() if sum_sq_scale is None else float(sum_sq_scale)
    settings = settings_for(lambdas, dreambooth)
    extra = sum_sq_settings(compare_sum_sq, scale) if compare_sum_sq else []
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
        return [(s, finetune_epochs, state, adam_state if continue_optimizer else None, points, samples_per_class,
                 seed_, memory) for s in finetune_order]

    previous_threads = torch.get_num_threads()
    # One intra-op thread per process: for a 96-wide MLP on 512 points, more threads only add
    # synchronisation (measured ~10x slower with 2 threads on a 2-core machine).
    _set_threads(1)
    try:
        if workers == 1:
            for sd in seed_list:
                state, adam_state, metrics, x, labels = _pretrain_task(pretrain_epochs, sd, samples_per_class)
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
                pending = {pool.submit(_pretrain_task, pretrain_epochs, sd, samples_per_class): ("pre", sd, None)
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
            "pretrain_epochs": pretrain_epochs,
            "finetune_epochs": finetune_epochs,
            "lambdas": [float(v) for v in lambdas],
            "regularizer": "mean_sq",
            "memory": memory,
            "dreambooth_prior_weight": DREAMBOOTH_PRIOR_WEIGHT if dreambooth else None,
            "sum_sq_comparison": None if not extra else {
                "mean_sq_lambdas": [s.nominal_lam for s in extra],
                "sum_sq_lambdas": [s.lam for s in extra],
                "scale": scale,
                "matched_scale": matched_sum_sq_scale(),
                "rule": "lambda_sum_sq = lambda_mean_sq * tensors / parameters (equal total weight; "
                        "see trainer.toy.matched_sum_sq_scale)",
                "parameter_shapes": {k: list(v) for k, v in parameter_shapes().items()},
            },
            "samples_per_class": samples_per_class,
            "hit_radius": HIT_RADIUS,
            "batch_size": BATCH,
            "lr": LR,
            "T": T,
            "continue_optimizer": continue_optimizer,
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


# -- over seeds ----------------------------------------------------------------------------
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


def _seed_text(seeds: Sequence[int]) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(v) for v in seeds)


def _mw(entry: dict[str, Any], key: str, signed: bool = False) -> str:
    """``median (worst)`` over the seeds; the value alone for one seed."""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if len(entry[key]["per_seed"]) == 1:
        return fmt.format(entry[key]["median"])
    return f"{fmt.format(entry[key]['median'])} ({fmt.format(entry[key]['worst'])})"


def _row_label(name: str, entry: dict[str, Any]) -> str:
    if name == "pretrained":
        return "pretrained (untrained baseline, before fine-tuning)"
    if entry["prior_weight"]:
        kept = _mw(entry, "preservation_class0")
        return f"DreamBooth-style (class 0 replayed x{entry['prior_weight']:g}; class 0 kept: {kept})"
    if entry.get("regularizer") not in (None, "mean_sq"):
        return f"{entry['regularizer']} lambda = {entry['lam']:.4g} (matched to mean_sq {entry['nominal_lam']:g})"
    return f"lambda = {entry['lam']:g}"


def markdown_table(report: dict[str, Any]) -> str:
    """The median (worst) over seeds per setting, as a GitHub markdown table.

    Rows: the pre-trained model (the untrained baseline: its adaptation is what doing nothing
    gives), each ``mean_sq`` lambda, the DreamBooth-style baseline.  A pure function of the
    ``toy.json`` content (no timings), so pasting it is reproducible.
    """
    summary = report["summary"]
    seeds = report["config"]["seeds"]
    n = len(seeds)
    stat = f"median (worst) over {n} seeds ({_seed_text(seeds)})" if n > 1 else f"seed {seeds[0]}"
    lines = [
        f"| setting - {stat} | mean preservation | worst-class preservation | adaptation "
        "| adaptation gain over pretrained | ‖delta‖ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = ["pretrained"] + [n_ for n_, e in summary.items()
                              if n_ != "pretrained" and e.get("regularizer", "mean_sq") in (None, "mean_sq")]
    names.sort(key=lambda n_: (n_ != "pretrained", summary[n_]["prior_weight"] > 0))  # stable: lambdas in order
    for name in names:
        e = summary[name]
        gain = "0 (baseline)" if name == "pretrained" else _mw(e, "adaptation_gain", signed=True)
        adapt = _mw(e, "adaptation")
        if name == "pretrained":
            adapt = f"**{adapt}**"
        lines.append(f"| {_row_label(name, e)} | {_mw(e, 'preservation_mean')} | {_mw(e, 'preservation_min')} "
                     f"| {adapt} | {gain} | {_norm(e)} |")
    return "\n".join(lines) + "\n"


def _norm(e: dict[str, Any]) -> str:
    """``||delta||``: median (max) over seeds (larger is further from the pre-trained model)."""
    d = e["delta_norm"]
    if d["max"] == 0:
        return "0"
    return f"{d['median']:.3g}" if len(d["per_seed"]) == 1 else f"{d['median']:.3g} (max {d['max']:.3g})"


def markdown_comparison_table(report: dict[str, Any]) -> str:
    """``mean_sq`` against ``sum_sq`` at matched strength, median (worst) over seeds ("" if not run)."""
    comparison = report["config"].get("sum_sq_comparison")
    if not comparison:
        return ""
    summary = report["summary"]
    lines = [
        f"| mean_sq lambda | L_lip | lambda - median (worst) over seeds {_seed_text(report['config']['seeds'])} "
        "| mean preservation | worst-class preservation | adaptation | ‖delta‖ |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lam in comparison["mean_sq_lambdas"]:
        for name in (f"lambda_{lam:g}", f"sum_sq_lambda_{lam:g}"):
            if name not in summary:
                continue
            e = summary[name]
            kind = e.get("regularizer") or "mean_sq"
            lam_text = f"{e['lam']:g}" if kind == "mean_sq" else f"{e['lam']:.4g}"
            lines.append(f"| {lam:g} | {kind} | {lam_text} | {_mw(e, 'preservation_mean')} "
                         f"| {_mw(e, 'preservation_min')} | {_mw(e, 'adaptation')} | {_norm(e)} |")
    return "\n".join(lines) + "\n"


def markdown_per_seed_table(report: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """Per seed and setting: mean preservation / worst-class preservation / adaptation."""
    seeds = [str(v) for v in report["config"]["seeds"]]
    summary = report["summary"]
    names = list(names) if names is not None else list(summary)
    lines = ["| setting | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
             "| --- |" + " --- |" * len(seeds)]
    for name in names:
        cells = []
        for sd in seeds:
            m = report["per_seed"][sd]["settings"][name]
            cells.append(f"{m['preservation_mean']:.2f} / {m['preservation_min']:.2f} / {m['adaptation']:.2f}")
        lines.append(f"| {_row_label(name, summary[name]).split(' (')[0] if name != 'pretrained' else 'pretrained'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_table(report: dict[str, Any]) -> str:
    seeds = report["config"]["seeds"]
    lines = []
    for sd in seeds:
        lines.append(f"seed {sd}")
        lines.append(f"  {'setting':<40} {'mean pres':>9} {'worst':>6} {'adapt':>6} {'||delta||':>9} {'s':>6}")
        for name, m in report["per_seed"][str(sd)]["settings"].items():
            lines.append(
                f"  {m['label']:<40} {m['preservation_mean']:9.3f} {m['preservation_min']:6.3f} "
                f"{m['adaptation']:6.3f} {m['delta_norm']:9.3f} {m['seconds']:6.1f}"
            )
    if len(seeds) > 1:
        lines.append(f"median (worst) over seeds {_seed_text(seeds)}")
        lines.append(f"  {'setting':<40} {'mean pres':>15} {'worst class':>15} {'adapt':>15}")
        for name, e in report["summary"].items():
            lines.append(f"  {e['label']:<40} {_mw(e, 'preservation_mean'):>15} {_mw(e, 'preservation_min'):>15} "
                         f"{_mw(e, 'adaptation'):>15}")
    lines.append(f"total {report['total_seconds']:.1f} s")
    return "\n".join(lines)


def _scale_arg(text: str) -> float:
    return matched_sum_sq_scale() if text == "matched" else float(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for toy.json and toy.png")
    parser.add_argument("--epochs-pretrain", type=int, default=1000)
    parser.add_argument("--epochs-finetune", type=int, default=5000)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument("--no-dreambooth", action="store_true", help="skip the DreamBooth-style baseline")
    parser.add_argument("--samples-per-class", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    seed_group = parser.add_mutually_exclusive_group()
    seed_group.add_argument("--seeds", default=None,
                            help="seeds to run: '0-7', '0,3,5', '4' (default: 0); the figure shows the first")
    seed_group.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    parser.add_argument("--compare-sum-sq", type=float, nargs="*", default=None, metavar="LAMBDA",
                        help="also fine-tune with the sum_sq L_lip at each of these mean_sq lambdas (> 0) "
                             "times --sum-sq-scale (no value: every swept lambda > 0)")
    parser.add_argument("--sum-sq-scale", type=_scale_arg, default=None, metavar="X|matched",
                        help="lambda_sum_sq = lambda_mean_sq * X; default 'matched' = tensors / parameters "
                             f"(= 1/{1 / matched_sum_sq_scale():.0f} for the toy)")
    parser.add_argument("--memory", choices=ORDER, default=None,
                        help="fine-tune in this memory mode (the node's memory input) instead of the paper's defaults")
    parser.add_argument("--fresh-optimizer", action="store_true",
                        help="start the fine-tunes with a fresh Adam instead of continuing pre-training's")
    args = parser.parse_args(argv)
    compare = args.compare_sum_sq
    if compare is not None and not compare:
        compare = [lam for lam in args.lambdas if lam > 0]
    report = run_toy(
        args.out,
        pretrain_epochs=args.epochs_pretrain,
        finetune_epochs=args.epochs_finetune,
        lambdas=args.lambdas,
        dreambooth=not args.no_dreambooth,
        samples_per_class=args.samples_per_class,
        workers=args.workers,
        continue_optimizer=not args.fresh_optimizer,
        seeds=args.seeds if args.seeds is not None else [DEFAULT_SEED if args.seed is None else args.seed],
        compare_sum_sq=compare,
        sum_sq_scale=args.sum_sq_scale,
        memory=args.memory,
        progress=True,
    )
    print(format_table(report))
    print()
    print(markdown_table(report))
    comparison = markdown_comparison_table(report)
    if comparison:
        print(comparison)


if __name__ == "__main__":
    main()
