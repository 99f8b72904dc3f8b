"""How the micro-world measures a fine-tune, as one API graph of stock nodes and the pack's own
(the tests, ``sweep.py`` and the docs all read the same numbers the same way).

For each model (the base, one ``LipschitzPersonalize`` run on the subject photos, or any other
MODEL built by nodes the caller passes as ``Loaded``: a LoRA through stock ``LoraLoaderModelOnly``)
and each sampling seed, stock ``KSampler``s draw a batch for the subject prompt and a batch for each
concept prompt (concepts the base model learned), all with the same seeds and latents:

* **subject fidelity**: CLIP-I of the subject batch to the photos (``LipschitzSubjectFidelity``);
* **prompt fidelity**: CLIP-T of the concept batch to its prompts (``LipschitzPromptFidelity``);
* **drift**: ``1 - paired cosine`` of the concept batch to the base model's concept batch drawn
  from the same noise (``LipschitzDrift``; 0 = draws what the base draws);
* **concept accuracy**: the share of the concept batch that the world's classifier
  (``classifier.py``, trained on true renders) names as the prompted concept (saved PNGs).

Every embedding comes from the micro-world's evaluation CLIP (``microworld-clip``).
"""
from __future__ import annotations

import functools
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUBJECT_DIR = REPO / "tests" / "data" / "microworld_subject"
CKPT = "microworld_sd15.safetensors"
EVAL = "microworld-clip"
RES = 64
SUBJECT_PROMPT = "a photo of sks square"
CLASS_PROMPT = "a photo of a square"
# Concepts the base model draws: the subject's class (DreamBooth's prior), the class in the
# base's colours, and other shapes.
CONCEPT_PROMPTS = (CLASS_PROMPT, "a photo of a red square", "a photo of a blue square", "a photo of a green circle",
                   "a photo of a yellow triangle")
# The world's fine-tune schedule (the paper: 1000 steps at 2e-6, 512 px; objective unchanged).
STEPS, LR = 100, 1e-4
TRAIN_SEED = 2025
SAMPLER = dict(steps=20, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
DREAMBOOTH_CLASS_IMAGES = 8
MAX_ROWS = 8  # a LipschitzMetricsTable's rows


@dataclass
class Scores:
    """One model's numbers for one sampling seed."""

    clip_i: float
    clip_t: float
    drift_per_prompt: dict[str, float] = field(default_factory=dict)  # empty for the base model
    accuracy: float | None = None       # None when the pictures were not saved

    @property
    def drift(self) -> float | None:
        """Mean drift over the concept prompts."""
        return statistics.fmean(self.drift_per_prompt.values()) if self.drift_per_prompt else None


@dataclass(frozen=True)
class Loaded:
    """A model the protocol does not train: ``nodes`` (API-graph nodes added as they are) end in
    the MODEL link ``model``."""

    nodes: dict
    model: list


def lora(file: str, strength: float = 1.0) -> Loaded:
    """The base model with a LoRA file of the server's ``models/loras``, through the stock loader
    every user has (so the measurement is the one a user gets, not the pack's own patching)."""
    node = f"lora {file}"
    return Loaded({node: {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["ckpt", 0], "lora_name": file, "strength_model": strength}}}, [node, 0])


def lora_name(rank: int) -> str:
    """The protocol's name for a trained delta exported at ``rank`` and loaded as a LoRA."""
    return f"LoRA rank {rank}"


@dataclass
class Exported:
    """What ``run_with_loras`` wrote: the LoRA files by rank, and the delta file."""

    loras: dict[int, Path]
    delta: Path


def run_with_loras(server, models: dict[str, dict | None], name: str, ranks: tuple[int, ...], seed: int,
                   batch: int = 2, save: bool = False, sampler: dict | None = None) -> tuple[dict[str, list[Scores]], Exported]:
    """Measure ``models`` for ``seed`` and, next to them, model ``name``'s delta exported as a LoRA
    at each of ``ranks`` (``LipschitzExtractLoRA``, biases and norms dropped: the default every
    loader reads) and loaded on the base by stock ``LoraLoaderModelOnly`` (named ``lora_name(rank)``).

    Two prompts: the LoRA loader checks its file name when the prompt is queued, so the files
    must exist before the second one; its base-model pictures come from ComfyUI's cache of the
    first (same nodes, same inputs)."""
    g = graph(models, (seed,), batch=batch, save=save, sampler=sampler)
    delta = [f"train_{name}", 1]
    prefix = re.sub(r"\W+", "_", name)
    g["export_delta"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": delta, "filename_prefix": prefix}}
    for rank in ranks:
        g[f"export_r{rank}"] = {"class_type": "LipschitzExtractLoRA", "inputs": {
            "delta": delta, "rank": rank, "filename_prefix": f"{prefix}_r{rank}"}}
    trained = _run(server, g, seed)
    files = {rank: _written(trained, f"export_r{rank}") for rank in ranks}
    loras: dict[str, dict | Loaded | None] = {"base": None, **{lora_name(r): lora(f) for r, f in files.items()}}
    loaded = _run(server, graph(loras, (seed,), batch=batch, save=save, sampler=sampler), seed)
    output_dir = server.output_dir if save else None
    out = scores(trained, models, (seed,), batch=batch, output_dir=output_dir)
    out.update(scores(loaded, {n: s for n, s in loras.items() if s is not None}, (seed,), batch=batch,
                      output_dir=output_dir))
    models_dir = server.base_dir / "models"
    return out, Exported({r: models_dir / "loras" / f for r, f in files.items()},
                         models_dir / "lipschitz_deltas" / _written(trained, "export_delta"))


def _run(server, g: dict, seed: int):
    result = server.client.run(g, timeout=3600)
    if result.status != "success":
        raise RuntimeError(f"seed {seed}: {(result.error or {}).get('exception_message', result.error)}")
    return result


def _written(result, node: str) -> str:
    """The file name an export node wrote (its text starts ``<folder>/<file>``)."""
    return result.outputs[node]["text"][0].split(":")[0].split("/")[-1]


def install(server, ckpt: Path | None = None) -> None:
    """Link the checkpoint (``make microworld``'s, built here if missing; or ``ckpt``) and the
    evaluation CLIP into a ``ComfyServer``'s folders, copy the photos."""
    from tools.microworld import build
    models = REPO / ".comfyui" / "models"
    eval_clip = models / "eval" / EVAL
    if ckpt is None and not (models / CKPT).is_file():
        build.write(models / CKPT)
    if not (eval_clip / "config.json").is_file():
        build.install_eval_clip(eval_clip.parent)
    ckpt = ckpt or models / CKPT
    target = server.checkpoints_dir / CKPT
    if not target.exists():
        target.symlink_to(ckpt)
    eval_dir = server.base_dir / "models" / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    if not (eval_dir / EVAL).exists():
        (eval_dir / EVAL).symlink_to(eval_clip, target_is_directory=True)
    shutil.copytree(SUBJECT_DIR, server.input_dir / SUBJECT_DIR.name, dirs_exist_ok=True)


def personalize(lam: float, seed: int = TRAIN_SEED, **overrides) -> dict:
    """``LipschitzPersonalize`` inputs for the subject with the world's schedule."""
    return {"prompt": SUBJECT_PROMPT, "lambda_reg": float(lam), "steps": STEPS, "learning_rate": LR,
            "seed": seed, "resolution": RES, "preview_every": 0, **overrides}  # measured, not watched: no previews


def dreambooth(seed: int = TRAIN_SEED, **overrides) -> dict:
    """DreamBooth: plain fine-tuning (lambda 0) with prior preservation on base-model class images."""
    return personalize(0.0, seed, class_prompt=CLASS_PROMPT, prior_weight=1.0, _class_images=True, **overrides)


def graph(models: dict[str, dict | Loaded | None], seeds: tuple[int, ...], batch: int = 2,
          concepts: tuple[str, ...] = CONCEPT_PROMPTS, save: bool = False, sampler: dict | None = None) -> dict:
    """The API graph: ``models`` maps a name to ``personalize(...)`` inputs, a ``Loaded`` model,
    or None for the base model (which must be among them: drift is measured against it)."""
    sampler = {**SAMPLER, **(sampler or {})}
    g: dict = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "refs": {"class_type": "LipschitzLoadReferenceImages",
                 "inputs": {"folder": SUBJECT_DIR.name, "resolution": RES, "crop": "center"}},
        "eval": {"class_type": "LipschitzEvalModelLoader", "inputs": {"model_name": EVAL}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": batch}},
        "subject_pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": SUBJECT_PROMPT}}}
    for i, text in enumerate(concepts):
        g[f"concept{i}_pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}}
    base = next(name for name, spec in models.items() if spec is None)
    rows: dict[int, list[tuple[str, list]]] = {seed: [] for seed in seeds}    # (label, metrics output)
    drift_rows: dict[int, list[tuple[str, list]]] = {seed: [] for seed in seeds}
    for name, spec in models.items():
        if spec is None:
            model = ["ckpt", 0]
        elif isinstance(spec, Loaded):
            g.update(spec.nodes)
            model = spec.model
        else:
            inputs = {k: v for k, v in spec.items() if not k.startswith("_")}
            if spec.get("_class_images"):
                _class_images(g, name, inputs["seed"], sampler)
                inputs["class_images"] = [f"{name}_class_img", 0]
            g[f"train_{name}"] = {"class_type": "LipschitzPersonalize", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["refs", 0], **inputs}}
            model = [f"train_{name}", 0]
        for seed in seeds:
            p = f"{name}_{seed}"
            _sample(g, f"{p}_subject", model, ["subject_pos", 0], seed, sampler)
            for i in range(len(concepts)):
                _sample(g, f"{p}_concept{i}", model, [f"concept{i}_pos", 0], seed, sampler)
                if name != base:  # drift per prompt, paired with the base model's pictures of the same noise
                    g[f"{p}_drift{i}"] = {"class_type": "LipschitzDrift", "inputs": {
                        "images": [f"{p}_concept{i}_img", 0], "base_images": [f"{base}_{seed}_concept{i}_img", 0],
                        "encoder": ["eval", 0]}}
                    drift_rows[seed].append((f"{name}: {concepts[i]}", [f"{p}_drift{i}", 4]))
            concept_batch = _image_batch(g, p, [[f"{p}_concept{i}_img", 0] for i in range(len(concepts))])
            g[f"{p}_fid"] = {"class_type": "LipschitzSubjectFidelity", "inputs": {
                "images": [f"{p}_subject_img", 0], "references": ["refs", 0], "clip": ["eval", 0]}}
            g[f"{p}_clipt"] = {"class_type": "LipschitzPromptFidelity", "inputs": {
                "images": concept_batch, "clip": ["eval", 0], "prompts": "\n".join(concepts),
                "token": "sks", "metrics": [f"{p}_fid", 2]}}
            rows[seed].append((name, [f"{p}_clipt", 1]))
            if save:
                g[f"{p}_save"] = {"class_type": "SaveImage", "inputs": {
                    "images": concept_batch, "filename_prefix": f"microworld/{p}_concepts"}}
    for seed in seeds:  # the output nodes that make the metric nodes run: tables of up to MAX_ROWS rows
        every = rows[seed] + drift_rows[seed]
        for k in range(0, len(every), MAX_ROWS):
            chunk = every[k:k + MAX_ROWS]
            g[f"table_{seed}_{k}"] = {"class_type": "LipschitzMetricsTable", "inputs": {
                **{f"metrics_{i + 1}": src for i, (_, src) in enumerate(chunk)},
                "row_labels": "\n".join(label for label, _ in chunk), "title": f"micro-world, sampling seed {seed}"}}
    return g


def _class_images(g: dict, name: str, seed: int, sampler: dict) -> None:
    """DreamBooth's class images: the base model's own samples of the class prompt."""
    g[f"{name}_class_pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": CLASS_PROMPT}}
    g[f"{name}_class_lat"] = {"class_type": "EmptyLatentImage", "inputs": {
        "width": RES, "height": RES, "batch_size": DREAMBOOTH_CLASS_IMAGES}}
    g[f"{name}_class_ks"] = {"class_type": "KSampler", "inputs": {
        "model": ["ckpt", 0], "positive": [f"{name}_class_pos", 0], "negative": ["neg", 0],
        "latent_image": [f"{name}_class_lat", 0], "seed": seed, **sampler}}
    g[f"{name}_class_img"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{name}_class_ks", 0], "vae": ["ckpt", 2]}}


def _sample(g: dict, p: str, model: list, positive: list, seed: int, sampler: dict) -> None:
    g[f"{p}_ks"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": ["neg", 0], "latent_image": ["lat", 0], "seed": seed, **sampler}}
    g[f"{p}_img"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{p}_ks", 0], "vae": ["ckpt", 2]}}


def _image_batch(g: dict, p: str, images: list[list]) -> list:
    """Stock ``ImageBatch`` nodes joining the pictures in prompt order."""
    out = images[0]
    for i, more in enumerate(images[1:], 1):
        g[f"{p}_join{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": out, "image2": more}}
        out = [f"{p}_join{i}", 0]
    return out


def _number(text: str, label: str) -> float:
    match = re.search(rf"{label} (-?[0-9.]+)", text)
    if not match:
        raise ValueError(f"no {label!r} in {text!r}")
    return float(match.group(1))


def scores(result, models: dict[str, dict | Loaded | None], seeds: tuple[int, ...], batch: int = 2,
           concepts: tuple[str, ...] = CONCEPT_PROMPTS, output_dir: Path | None = None) -> dict[str, list[Scores]]:
    """Each model's ``Scores`` per seed, read from the run's node texts (and, with ``output_dir``,
    the saved concept pictures judged by the classifier)."""
    judge = _judge() if output_dir else None
    out: dict[str, list[Scores]] = {}
    for name in models:
        out[name] = []
        for seed in seeds:
            p = f"{name}_{seed}"
            text = lambda node: result.outputs[node]["text"][0]
            s = Scores(clip_i=_number(text(f"{p}_fid"), "CLIP-I"), clip_t=_number(text(f"{p}_clipt"), "CLIP-T"))
            s.drift_per_prompt = {c: 1.0 - _number(text(f"{p}_drift{i}"), "drift cosine")
                                  for i, c in enumerate(concepts) if f"{p}_drift{i}" in result.outputs}
            if judge is not None:
                s.accuracy = _accuracy(judge, output_dir, f"{p}_concepts", batch, concepts)
            out[name].append(s)
    return out


def median(per_seed: list[Scores], what: str) -> float:
    return statistics.median(getattr(s, what) for s in per_seed)


@functools.cache
def _judge():
    """The classifier, trained once per process (seconds)."""
    from tools.microworld import classifier
    return classifier.train()


def _accuracy(judge, output_dir: Path, prefix: str, batch: int, concepts: tuple[str, ...]) -> float:
    from lipschitz_personalize.trainer.render.images import to_tensor
    from PIL import Image

    from tools.microworld import classifier, world
    files = sorted((output_dir / "microworld").glob(f"{prefix}_*.png"))[-batch * len(concepts):]
    images = to_tensor([Image.open(f).convert("RGB") for f in files])
    named = [world.CONCEPTS[int(k)] for k in classifier.predict(judge, images)]
    wanted = [tuple(c.removeprefix("a photo of a ").split()) for c in concepts for _ in range(batch)]
    # "a square" asks for the shape only; "a red square" for both
    hits = [got[1] == want[-1] and (len(want) == 1 or got[0] == want[0]) for got, want in zip(named, wanted)]
    return sum(hits) / len(hits)
