#!/usr/bin/env python3
"""Does the micro-world's base model follow its prompts?  Sample every concept through ComfyUI's
own sampling path (``comfy.sample.sample``, what the KSampler node calls, with the node's noise)
from the assembled checkpoint, and let the classifier trained on true renders name each sample.

    .venv/bin/python tools/microworld/prompt_accuracy.py --ckpt .comfyui/models/microworld_sd15.safetensors \\
        --json docs/microworld_accuracy.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from microworld import build, classifier, world

SAMPLER = dict(sampler_name="euler", scheduler="normal", steps=20, cfg=5.0)


def sample(model, clip, vae, prompt: str, seeds: list[int], steps: int, cfg: float, sampler_name: str,
           scheduler: str) -> torch.Tensor:
    """Decoded IMAGE ``[len(seeds), 64, 64, 3]``, one KSampler run per seed."""
    import comfy.sample
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    out = []
    for seed in seeds:
        latent = torch.zeros(1, 4, world.SIZE // 8, world.SIZE // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        z = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, pos, neg, latent,
                                disable_pbar=True, seed=seed)
        out.append(vae.decode(z))
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=5, help="samples per concept (seeds 0..N-1)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--grid", type=Path, help="also save the samples as a PNG grid (rows: concepts)")
    ap.add_argument("--cfg", type=float, default=SAMPLER["cfg"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unet-label", default="tools/microworld/weights/unet.safetensors",
                    help="which U-Net weights the checkpoint holds (recorded in the JSON)")
    args = ap.parse_args(argv)
    sampler = {**SAMPLER, "cfg": args.cfg}
    torch.set_num_threads(args.threads)
    build.use_comfy_in_process(cpu=True)
    import comfy.sd
    t0 = time.time()
    judge = classifier.train()
    judge_acc = classifier.accuracy_on_fresh_renders(judge)
    torch.set_grad_enabled(False)  # TAESD's vae_scale is a Parameter: decoded images would carry grad
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(args.ckpt))
    seeds = list(range(args.seeds))
    hits, rows, per = 0, [], {}
    for k, (color, shape) in enumerate(world.CONCEPTS):
        imgs = sample(model, clip, vae, world.concept_prompt(color, shape), seeds, **sampler)
        pred = classifier.predict(judge, imgs)
        per[f"{color} {shape}"] = float((pred == k).float().mean())
        hits += int((pred == k).sum())
        rows.append(imgs)
        print(f"{color} {shape}: {per[f'{color} {shape}']:.2f} "
              f"(named: {[' '.join(world.CONCEPTS[int(p)]) for p in pred]})", flush=True)
    total = len(seeds) * len(world.CONCEPTS)
    result = {"prompt_accuracy": hits / total, "samples": total, "per_concept": per,
              "classifier_accuracy_on_true_renders": judge_acc, "sampler": sampler, "seeds": seeds,
              "checkpoint": args.ckpt.name, "unet": args.unet_label, "seconds": round(time.time() - t0, 1),
              "command": "python tools/microworld/prompt_accuracy.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    print(json.dumps({k: result[k] for k in ("prompt_accuracy", "samples", "classifier_accuracy_on_true_renders")}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.grid:
        import numpy as np
        from PIL import Image
        grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).clamp(0, 1).numpy()
        Image.fromarray((grid * 255).round().astype(np.uint8)).save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
