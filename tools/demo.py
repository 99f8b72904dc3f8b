#!/usr/bin/env python3
"""``make demo``: run the shipped ``workflows/compare_lambda.json`` headlessly on a real ComfyUI.

* starts ComfyUI (``main.py``) with this pack in ``output/demo_server/`` (kept between runs, so
  finished fine-tunes are loaded from its ``models/lipschitz_deltas`` instead of retrained;
  ``--fresh`` starts over);
* copies the shipped reference photos (``tests/data/dog``) into its ``input/dog`` folder;
* uses the SD1.5 checkpoint given with ``--ckpt PATH``, else one found in ComfyUI's
  ``models/checkpoints`` (a name containing ``v1-5``, ``sd15`` or ``1.5``), else the
  micro-world (``make microworld``, docs/microworld.md): a small SD1.5-layout checkpoint
  pretrained on pictures of coloured shapes, run with its own variant of the workflow
  (``tools/microworld/compare_lambda_microworld.json``: the subject "sks square", its schedule,
  its evaluation CLIP), so the grid and table show what lambda does, once its base model passes
  its quality bar (``docs/microworld_accuracy.json``; ``--world`` forces it); else, or with
  ``--tiny``, the tiny random-weight stand-in ``.comfyui/models/tiny_sd15.safetensors`` (noise:
  plumbing only);
* scores each model with the evaluation encoders in ComfyUI's ``models/eval`` (CLIP ViT-B/32 as
  ``clip-vit-base-patch32/``, DINO ViT-S/16 as ``dino-vits16/``), else with the tiny random
  stand-ins from ``make tiny-encoders`` (their numbers mean nothing, and the table says so);
* converts the workflow with ``tools/workflow_convert.py``, prints the training progress and the
  metrics table, and writes the comparison grid, the metrics table and the training report to
  ``output/``.

    python tools/demo.py                      # checkpoint found, or the micro-world
    python tools/demo.py --ckpt ~/models/v1-5-pruned-emaonly.safetensors --steps 400
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from comfy_server import ComfyServer, ComfyServerError  # noqa: E402
from setup_comfyui import comfyui_root  # noqa: E402
from make_tiny_encoders import REAL_NAMES, ensure  # noqa: E402
from workflow_convert import apply_overrides, convert  # noqa: E402

WORKFLOW = REPO / "workflows" / "compare_lambda.json"
TINY = REPO / ".comfyui" / "models" / "tiny_sd15.safetensors"
PHOTOS = REPO / "tests" / "data" / "dog"
WORLD_WORKFLOW = TOOLS / "microworld" / "compare_lambda_microworld.json"
WORLD = REPO / ".comfyui" / "models" / "microworld_sd15.safetensors"
WORLD_EVAL = REPO / ".comfyui" / "models" / "eval" / "microworld-clip"
WORLD_PHOTOS = REPO / "tests" / "data" / "microworld_subject"
WORLD_ACCURACY = REPO / "docs" / "microworld_accuracy.json"  # tools/microworld/prompt_accuracy.py


def world_is_trained() -> bool:
    """Whether the committed micro-world base model passed its quality bar (names its prompted
    concept for at least 80% of samples): only then is it the default."""
    return WORLD_ACCURACY.is_file() and json.loads(WORLD_ACCURACY.read_text())["prompt_accuracy"] >= 0.8
TINY_EVAL = REPO / ".comfyui" / "models" / "eval"
OUT = REPO / "output"
SD15_HINTS = ("v1-5", "v1_5", "sd15", "sd_15", "sd-1.5", "1.5")
CKPT_EXT = (".safetensors", ".ckpt")
# The tiny stand-in: few steps at 64 px, and a learning rate large enough that a few steps
# move the weights (the paper's 2e-6 is meant for 1000 steps).
TINY_TRAIN_STEPS, TINY_SAMPLE_STEPS, TINY_RES, TINY_LR = 8, 4, 64, 1e-4


def say(msg: str = "") -> None:
    print(msg, flush=True)


def find_sd15() -> Path | None:
    dirs = []
    try:
        dirs.append(comfyui_root(fetch=False) / "models" / "checkpoints")
    except RuntimeError:  # no ComfyUI tree yet: ComfyServer fetches it
        pass
    if os.environ.get("COMFYUI_PATH"):
        dirs.append(Path(os.environ["COMFYUI_PATH"]).expanduser() / "models" / "checkpoints")
    for d in dict.fromkeys(dirs):
        if not d.is_dir():
            continue
        for f in sorted(d.rglob("*")):
            if f.suffix.lower() in CKPT_EXT and any(h in f.name.lower() for h in SD15_HINTS) and f.is_file():
                return f
    return None


def ensure_tiny() -> Path:
    if not TINY.is_file():
        say(f"making the tiny stand-in checkpoint {TINY.relative_to(REPO)} ...")
        subprocess.run([sys.executable, str(TOOLS / "make_tiny_checkpoint.py"), "--out", str(TINY), "--arch", "sd15"],
                       check=True)
    return TINY


def ensure_world() -> Path:
    if not (WORLD.is_file() and (WORLD_EVAL / "config.json").is_file()):
        say(f"assembling the micro-world checkpoint {WORLD.relative_to(REPO)} ...")
        subprocess.run([sys.executable, str(TOOLS / "microworld" / "build.py"), "--out", str(WORLD),
                        "--eval-dir", str(WORLD_EVAL.parent)], check=True)
    return WORLD


def eval_models(eval_dir: Path) -> list[str]:
    """Link the evaluation encoders the workflow loads: ComfyUI's own (models/eval) where they
    exist, else the tiny random stand-ins; returns the names that are stand-ins."""
    real_dir = comfyui_root(fetch=False) / "models" / "eval"
    stand_ins = ensure(TINY_EVAL)
    missing = [name for name in REAL_NAMES.values() if not (real_dir / name).exists()]
    for name in REAL_NAMES.values():
        link_into(eval_dir, stand_ins / name if name in missing else real_dir / name)
    return missing


def link_into(folder: Path, target: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / target.name
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return link.name
        link.unlink()
    link.symlink_to(target.resolve())
    return link.name


class Printer:
    """Readable progress from the websocket messages of one run."""

    SHOWN = {"LipschitzPersonalize": "fine-tune", "KSampler": "sample", "LipschitzLabeledGrid": "grid",
             "LipschitzTrainingReport": "report", "SaveImage": "save", "CheckpointLoaderSimple": "load",
             "LipschitzLoadReferenceImages": "photos", "LipschitzMetricsTable": "table"}

    def __init__(self, prompt: dict):
        self.prompt = prompt
        self.t0 = time.monotonic()
        self.last_step: dict[str, int] = {}

    def stamp(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"[{s // 60:02d}:{s % 60:02d}]"

    def __call__(self, msg: dict) -> None:
        kind, data = msg.get("type"), msg.get("data") or {}
        if kind == "executing" and data.get("node") is not None:
            node = self.prompt.get(str(data["node"])) or {}
            label = self.SHOWN.get(node.get("class_type"))
            if label:
                say(f"{self.stamp()} {label:9s} {node.get('_meta', {}).get('title', node.get('class_type'))}")
        elif kind == "execution_cached" and data.get("nodes"):
            say(f"{self.stamp()} cached    {len(data['nodes'])} node(s) unchanged since the last run")
        elif kind == "lipschitz.progress":
            step, total = int(data["step"]), int(data["total"])
            every = max(1, total // 10)
            if step == 1 or step == total or step % every == 0:
                say(f"{self.stamp()}   lambda={data['lambda']:<7g} step {step:>5}/{total}  denoise {data['denoise']:.4f}  "
                    f"L_lip {data['lip']:.3e}  |delta| {data['delta_norm']:.4g}  {data['steps_per_s']:.2f} it/s  "
                    f"ETA {int(data['eta_s'])}s")
        elif kind == "execution_error":
            say(f"{self.stamp()} ERROR in node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_message', '').strip()}")


def _cuda_available() -> bool:
    """Whether the venv's torch sees a CUDA GPU (the real-checkpoint demo then uses it)."""
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run workflows/compare_lambda.json headlessly and save its grid and report.")
    ap.add_argument("--ckpt", type=Path, help="an SD1.5 checkpoint (.safetensors); default: found in ComfyUI's "
                                              "models/checkpoints, else the micro-world")
    ap.add_argument("--tiny", action="store_true", help="use the tiny random-weight stand-in (noise: plumbing only)")
    ap.add_argument("--world", action="store_true", help="use the micro-world even if a real checkpoint is found")
    ap.add_argument("--steps", type=int, help="fine-tune steps per lambda (workflow: 1000; tiny: %d)" % TINY_TRAIN_STEPS)
    ap.add_argument("--sample-steps", type=int, help="sampler steps (workflow: 30; tiny: %d)" % TINY_SAMPLE_STEPS)
    ap.add_argument("--resolution", type=int, help="training and sampling size in px (workflow: 512; tiny: %d)" % TINY_RES)
    ap.add_argument("--workflow", type=Path, help=f"default: {WORKFLOW.relative_to(REPO)} "
                                                  f"(micro-world: {WORLD_WORKFLOW.relative_to(REPO)})")
    ap.add_argument("--server-dir", type=Path, default=OUT / "demo_server")
    ap.add_argument("--fresh", action="store_true", help="delete the demo server folder (and its cached runs) first")
    ap.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even with a real checkpoint and a GPU")
    ap.add_argument("--timeout", type=float, default=6 * 3600)
    args = ap.parse_args(argv)
    t_start = time.monotonic()

    ckpt = None if (args.tiny or args.world) else (args.ckpt or find_sd15())
    world = args.world or (ckpt is None and not args.tiny and world_is_trained())
    tiny = ckpt is None and not world
    if args.ckpt and not args.ckpt.is_file():
        say(f"error: --ckpt {args.ckpt} is not a file")
        return 2
    args.workflow = args.workflow or (WORLD_WORKFLOW if world else WORKFLOW)
    if world:
        ckpt = ensure_world()
        say("NOTE: using the MICRO-WORLD (docs/microworld.md; --ckpt PATH takes an SD1.5 checkpoint): a small checkpoint in")
        say("      SD1.5's layout pretrained on 64 px pictures of coloured shapes; the subject is 'sks square'.")
        say("      Not SD1.5: real fine-tuning, sampling and metrics at a scale a CPU runs in minutes.")
    if tiny:
        ckpt = ensure_tiny()
        say("NOTE: no SD1.5 checkpoint found (give one with --ckpt PATH or put e.g. v1-5-pruned-emaonly.safetensors")
        say("      in ComfyUI's models/checkpoints). Using the tiny RANDOM-WEIGHT stand-in: its images are noise.")
        say("      This proves the plumbing (training, sampling, grid, report), not the quality.")
        say(f"      Reduced for a CPU: {args.steps or TINY_TRAIN_STEPS} fine-tune steps per lambda at "
            f"{args.resolution or TINY_RES} px (lr {TINY_LR:g}), {args.sample_steps or TINY_SAMPLE_STEPS} sampler steps.")
    say(f"checkpoint: {ckpt}")

    server_dir = args.server_dir.resolve()
    if args.fresh and server_dir.exists():
        shutil.rmtree(server_dir)
    use_gpu = not (tiny or args.cpu) and _cuda_available()
    server = ComfyServer(server_dir, cpu=not use_gpu)
    ckpt_name = link_into(server.checkpoints_dir, ckpt)
    tiny_eval = [] if world else eval_models(server_dir / "models" / "eval")
    if world:
        link_into(server_dir / "models" / "eval", WORLD_EVAL)
    if tiny_eval:
        say(f"NOTE: no {' / '.join(tiny_eval)} in ComfyUI's models/eval: the metrics use tiny RANDOM stand-in "
            f"encoders (numbers meaningless).")
    photos = WORLD_PHOTOS if world else PHOTOS
    subject = server.input_dir / photos.name
    subject.mkdir(parents=True, exist_ok=True)
    for f in sorted(photos.glob("*.jpg")) + sorted(photos.glob("*.png")):
        shutil.copy2(f, subject / f.name)

    say(f"starting ComfyUI in {server_dir.relative_to(REPO) if server_dir.is_relative_to(REPO) else server_dir} "
        f"(log: {server.log_path.name}) ...")
    try:
        server.start()
    except ComfyServerError as exc:
        say(f"error: ComfyUI did not start: {exc}")
        return 1
    try:
        say(f"ComfyUI ready at {server.url} after {server.startup_seconds:.0f}s")
        info = server.client.object_info()
        ui = json.loads(args.workflow.read_text())
        prompt = convert(ui, info)
        steps = args.steps or (TINY_TRAIN_STEPS if tiny else None)
        res = args.resolution or (TINY_RES if tiny else None)
        sample_steps = args.sample_steps or (TINY_SAMPLE_STEPS if tiny else None)
        rules: dict[str, dict] = {"*": {"ckpt_name": ckpt_name}}

        def put(cls: str, **values) -> None:
            rules.setdefault(cls, {}).update(values)

        put("LipschitzPersonalize", preview_every=0)  # headless: nobody watches the previews
        if steps:
            put("LipschitzPersonalize", steps=steps)
        if res:
            put("LipschitzPersonalize", resolution=res)
            put("LipschitzLoadReferenceImages", resolution=res)
            put("EmptyLatentImage", width=res, height=res)
        if sample_steps:
            put("KSampler", steps=sample_steps)
        if tiny:
            put("LipschitzPersonalize", learning_rate=TINY_LR)
        if tiny or tiny_eval:
            put("LipschitzMetricsTable", title=(
                f"{'tiny random-weight checkpoint, ' if tiny else ''}"
                f"{'tiny random encoders, ' if tiny_eval else ''}numbers meaningless: the plumbing, not the method"))
        if steps or res or sample_steps:  # the grid's title must not claim the workflow's settings
            put("LipschitzLabeledGrid", title=(
                f"{'tiny random-weight stand-in (noise), ' if tiny else ''}lambda sweep: "
                f"{steps or 'workflow'} fine-tune steps, {res or (64 if world else 512)} px, {sample_steps or (20 if world else 30)} sampler steps"))
        prompt = apply_overrides(prompt, rules)
        trains = [n for n in prompt.values() if n["class_type"] == "LipschitzPersonalize"]
        lambdas = ", ".join(f"{n['inputs']['lambda_reg']:g}" for n in trains)
        say(f"workflow {args.workflow.name}: {len(prompt)} nodes, {len(trains)} fine-tune(s) (lambda {lambdas}), "
            f"{trains[0]['inputs']['steps'] if trains else 0} steps each")
        if not (tiny or world) and not use_gpu:
            say("note: ComfyUI runs on the CPU here; a real SD1.5 fine-tune at 512 px is slow on a CPU "
                "(use --steps/--resolution for a shorter run).")

        result = server.client.run(prompt, timeout=args.timeout, on_message=Printer(prompt))
        if result.status != "success":
            err = result.error or {}
            say(f"the run ended with status {result.status}: {err.get('exception_message', err)}")
            say(f"server log: {server.log_path}")
            return 1

        OUT.mkdir(exist_ok=True)
        written = []
        names = {"LipschitzLabeledGrid": f"{args.workflow.stem}_grid.png",
                 "LipschitzTrainingReport": f"{'microworld_' if world else ''}training_report.png",
                 "LipschitzMetricsTable": f"{args.workflow.stem}_metrics.png"}
        for nid, node in prompt.items():
            src = node["inputs"].get("images")
            if node["class_type"] != "SaveImage" or not isinstance(src, list):
                continue
            name = names.get(prompt[src[0]]["class_type"])
            images = (result.outputs.get(nid) or {}).get("images") or []
            if name and images:
                img = images[0]
                dest = OUT / name
                shutil.copy2(server.output_dir / img.get("subfolder", "") / img["filename"], dest)
                written.append(dest)
        for nid, node in prompt.items():
            if node["class_type"] == "LipschitzMetricsTable":
                say("metrics table:")
                say((result.outputs.get(nid) or {}).get("text", ["(none)"])[0].split("```csv")[0].rstrip())
        say(f"done in {time.monotonic() - t_start:.0f}s.")
        for p in written:
            say(f"  wrote {p.relative_to(REPO) if p.is_relative_to(REPO) else p}")
        if tiny:
            say("  (tiny random-weight checkpoint: the images are noise; the report's curves are real)")
        return 0 if written else 1
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
