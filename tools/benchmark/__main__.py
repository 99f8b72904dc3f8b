"""``python -m tools.benchmark``: the paper's DreamBooth benchmark, headless, one row per (subject, lambda).

    python -m tools.benchmark --model SD15_DIR --data ../shared/datasets/dreambooth512 \\
        --clip clip-vit-base-patch32/ --dino dino-vits16/ --lambdas 0 500 --out output/benchmark [--ray]

Defaults are the paper's protocol (1000 steps, lr 2e-6, seed 2025, 512 px; 25 prompts x 4
images, 50 steps, CFG 7.5).  ``--smoke`` builds tiny random models under OUT and runs the whole
pipeline on two subjects in a few minutes on a CPU (``make benchmark-smoke``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from functools import partial
from pathlib import Path

from .job import Settings

SMOKE = dict(steps=8, lr=1e-4, resolution=64, prompts=2, images_per_prompt=2, sample_steps=4, drift_classes=2, drift_images=2)
SMOKE_SUBJECTS = ("dog", "can")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="diffusers SD1.5 folder, or a .safetensors checkpoint with --config")
    ap.add_argument("--config", help="diffusers SD1.5 folder holding the configs/tokenizer for a single-file --model")
    ap.add_argument("--data", required=True, help="DreamBooth benchmark folder (prompts_and_classes.txt + subjects)")
    ap.add_argument("--clip", help="CLIP encoder (folder or .safetensors), e.g. clip-vit-base-patch32")
    ap.add_argument("--dino", help="DINO ViT folder, e.g. dino-vits16")
    ap.add_argument("--tokenizer-dir", help="CLIP tokenizer files when --clip is a single file")
    ap.add_argument("--drift-prompts", help="text file, one drift prompt a line (default: ImageNet class names)")
    ap.add_argument("--out", required=True, type=Path, help="results folder; run again with it to resume")
    ap.add_argument("--subjects", nargs="*", help="subset of subjects (default: all 30)")
    ap.add_argument("--lambdas", nargs="+", type=float, default=[500.0], help="default 500 (the paper)")
    for f in fields(Settings):
        if f.name not in {"model", "config", "data", "out", "clip", "dino", "tokenizer_dir", "drift_prompts"}:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                            help=f"default {f.default}")
    ap.add_argument("--ray", action="store_true", help="run the jobs as Ray tasks (pip install ray)")
    ap.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--cpus-per-job", type=int, default=1, help="CPU threads per job where there is no GPU")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny random models under OUT/models, subjects {' '.join(SMOKE_SUBJECTS)}, few steps")
    return ap.parse_args(argv)


def smoke_models(out: Path) -> dict[str, str]:
    """Tiny random diffusers SD1.5 and encoders under ``out`` (written once)."""
    from tools.make_tiny_encoders import write as write_encoders

    from . import make_tiny_diffusers

    sd, encoders = out / "tiny-sd15-diffusers", out / "encoders"
    if not (sd / "model_index.json").is_file():
        make_tiny_diffusers.write(sd)
    if not (encoders / "tiny-dino" / "config.json").is_file():
        write_encoders(encoders)
    return {"model": str(sd), "clip": str(encoders / "tiny-clip"), "dino": str(encoders / "tiny-dino")}


def settings_from(args: argparse.Namespace) -> Settings:
    values = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    values.update(data=str(args.data), out=str(args.out))
    if args.smoke:
        values = {**SMOKE, **smoke_models(args.out / "models"), **values}
    missing = [name for name in ("model", "clip", "dino") if not values.get(name)]
    if missing:
        raise SystemExit(f"missing {', '.join('--' + m for m in missing)} (or --smoke for tiny stand-ins)")
    return Settings(**values)


def main(argv: list[str] | None = None) -> int:
    from . import protocol, runner

    args = parse(argv)
    if args.ray:
        from .ray_jobs import require_ray

        require_ray()  # before any work
    try:
        bench = protocol.read_benchmark(args.data)
        subjects = protocol.select(bench, args.subjects or (list(SMOKE_SUBJECTS) if args.smoke else None))
        if args.drift_prompts:
            protocol.drift_prompts(1, args.drift_prompts)  # a bad file: before any work
        settings = settings_from(args)
    except protocol.ProtocolError as exc:
        raise SystemExit(str(exc)) from None
    jobs = runner.plan([s.name for s in subjects], args.lambdas)
    if args.ray:
        from .ray_jobs import run_on_ray

        run = partial(run_on_ray, address=args.ray_address, num_cpus=args.ray_cpus, cpus_per_job=args.cpus_per_job)
    else:
        run = runner.run_in_process
    try:
        report = runner.run(settings, jobs, run)
    except runner.SettingsChanged as exc:
        raise SystemExit(str(exc)) from None
    print(f"{len(report['ran'])} jobs run, {len(report['reused'])} read back, {len(report['failed'])} failed; "
          f"wrote {args.out / 'results.csv'}, {args.out / 'summary.md'}, {args.out / 'lambda_plot.png'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
