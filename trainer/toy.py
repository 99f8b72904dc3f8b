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
* ``delta_norm``: ``||theta - theta0||`` over all parameters; ``seconds`` of fine-tuning.

``python -m trainer.toy --out DIR`` writes ``DIR/toy.json`` and ``DIR/toy.png`` (one scatter
panel per setting plus the pre-trained model, drawn with Pillow).  The settings run in
parallel worker processes (one thread each), and every random draw is seeded, so the numbers
do not depend on the worker count.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .delta import ParameterDelta
from .config import TrainConfig
from .loop import RegularizedTrainer

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

    @property
    def label(self) -> str:
        if self.name == "pretrained":
            return "pretrained"
        if self.prior_weight > 0:
            return f"DreamBooth (class 0 x{self.prior_weight:g})"
        return f"lambda = {self.lam:g}"


def settings_for(lambdas: Sequence[float], dreambooth: bool = True) -> list[Setting]:
    out = [Setting(f"lambda_{lam:g}", float(lam)) for lam in lambdas]
    if dreambooth:
        out.append(Setting("dreambooth", 0.0, DREAMBOOTH_PRIOR_WEIGHT))
    return out


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
    threads: int = 1,
) -> dict[str, Any]:
    """One fine-tune from the pre-trained weights; returns its metrics and samples."""
    _set_threads(threads)
    start = time.perf_counter()
    model = ToyEpsModel()
    model.load_state_dict(pretrained)
    model.requires_grad_(False)
    x, labels = points
    new = labels == NEW_CLASS
    data = EpochBatches(x[new], labels[new])
    prior = None
    if setting.prior_weight > 0:
        zero = labels == 0
        prior = EpochBatches(x[zero], labels[zero])
    delta = ParameterDelta(model)
    config = TrainConfig(
        steps=epochs * data.batches_per_epoch,
        lr=LR,
        lam=setting.lam,
        seed=_rng_seed(seed, FINETUNE_SEED),
        prior_weight=setting.prior_weight if prior is not None else 1.0,
    )
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
        delta_norm=float(torch.stack([d.detach().double().norm() for d in delta.tensors()]).norm()),
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
def run_toy(
    out_dir: str | os.PathLike[str] | None,
    pretrain_epochs: int = 1000,
    finetune_epochs: int = 5000,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    dreambooth: bool = True,
    samples_per_class: int = 1000,
    workers: int | None = None,
    continue_optimizer: bool = True,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Pre-train, fine-tune every setting, evaluate; write ``toy.json``/``toy.png`` to ``out_dir``.

    Returns the JSON's content: ``settings`` maps a setting's name (``pretrained``,
    ``lambda_<lam>``, ``dreambooth``) to its metrics.
    """
    start = time.perf_counter()
    cores = os.cpu_count() or 1
    workers = workers if workers is not None else min(2, cores)
    points = make_points(seed)
    previous_threads = torch.get_num_threads()
    # One intra-op thread per process: for a 96-wide MLP on 512 points, more threads only add
    # synchronisation (measured ~10x slower with 2 threads on a 2-core machine).
    _set_threads(1)
    settings = settings_for(lambdas, dreambooth)
    pool = None
    if workers > 1 and len(settings) > 1:
        # Spawned (not forked: the parent's OpenMP state does not survive a fork), and started
        # now so that the workers import torch on the other core while pre-training runs.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(workers):
            pool.submit(_set_threads, 1)
    try:
        pretrained, adam_state, pre_seconds = _pretrain(pretrain_epochs, points, seed)
        model = ToyEpsModel()
        model.load_state_dict(pretrained)
        pre_metrics, pre_x, pre_labels = evaluate(model, samples_per_class, seed)
        # Longest first (the DreamBooth baseline runs two forwards a step) to balance the workers.
        settings.sort(key=lambda s: s.prior_weight > 0, reverse=True)
        args = [(s, finetune_epochs, pretrained, adam_state if continue_optimizer else None, points, samples_per_class, seed)
                for s in settings]
        if pool is not None:
            futures = [pool.submit(_finetune, *a) for a in args]
            results = [f.result() for f in futures]
        else:
            results = [_finetune(*a) for a in args]
    finally:
        _set_threads(previous_threads)
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    order = {s.name: i for i, s in enumerate(settings_for(lambdas, dreambooth))}
    results_in_order = sorted(results, key=lambda r: order[r["name"]])
    pre_metrics.update(label="pretrained", lam=None, prior_weight=0.0, delta_norm=0.0,
                       steps=pretrain_epochs * math.ceil(N_BASE * POINTS_PER_CLASS / BATCH), seconds=pre_seconds)
    report: dict[str, Any] = {
        "config": {
            "pretrain_epochs": pretrain_epochs,
            "finetune_epochs": finetune_epochs,
            "lambdas": [float(v) for v in lambdas],
            "dreambooth_prior_weight": DREAMBOOTH_PRIOR_WEIGHT if dreambooth else None,
            "samples_per_class": samples_per_class,
            "hit_radius": HIT_RADIUS,
            "batch_size": BATCH,
            "lr": LR,
            "T": T,
            "continue_optimizer": continue_optimizer,
            "workers": workers,
            "seed": seed,
        },
        "settings": {"pretrained": pre_metrics, **{r["name"]: r["metrics"] for r in results_in_order}},
    }
    report["total_seconds"] = time.perf_counter() - start
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        base = pre_labels < N_BASE  # class 5's embedding is untrained before fine-tuning
        panels = [("pretrained", pre_x[base], pre_labels[base])] + [(r["metrics"]["label"], r["samples"], r["labels"]) for r in results_in_order]
        draw_figure(panels, out / "toy.png")
        report["total_seconds"] = time.perf_counter() - start
        (out / "toy.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'setting':<26} {'mean pres':>9} {'worst':>6} {'adapt':>6} {'||delta||':>9} {'s':>6}"]
    for name, m in report["settings"].items():
        lines.append(
            f"{m['label']:<26} {m['preservation_mean']:9.3f} {m['preservation_min']:6.3f} "
            f"{m['adaptation']:6.3f} {m['delta_norm']:9.3f} {m['seconds']:6.1f}"
        )
    lines.append(f"total {report['total_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for toy.json and toy.png")
    parser.add_argument("--epochs-pretrain", type=int, default=1000)
    parser.add_argument("--epochs-finetune", type=int, default=5000)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument("--no-dreambooth", action="store_true", help="skip the DreamBooth-style baseline")
    parser.add_argument("--samples-per-class", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="fine-tune processes (default: min(2, cores))")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed of every random stream")
    parser.add_argument("--fresh-optimizer", action="store_true",
                        help="start the fine-tunes with a fresh Adam instead of continuing pre-training's")
    args = parser.parse_args(argv)
    report = run_toy(
        args.out,
        pretrain_epochs=args.epochs_pretrain,
        finetune_epochs=args.epochs_finetune,
        lambdas=args.lambdas,
        dreambooth=not args.no_dreambooth,
        samples_per_class=args.samples_per_class,
        workers=args.workers,
        continue_optimizer=not args.fresh_optimizer,
        seed=args.seed,
    )
    print(format_table(report))


if __name__ == "__main__":
    main()
