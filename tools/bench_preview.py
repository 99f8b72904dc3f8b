#!/usr/bin/env python3
"""What one training preview costs (``preview_every``, nodes/host/preview.py), on the CPU.

    python tools/bench_preview.py               # full-size SD1.5 U-Net and VAE (random weights)
    python tools/bench_preview.py --tiny        # the test U-Net (25.8M), same VAE

A preview is, per prompt, ``preview_steps`` U-Net forwards on a CFG batch of 2 at the preview
size, with the run's delta applied as the training applies it (:meth:`ParameterDelta.applied`,
no gradient), and one VAE decode.  Each part runs in a fresh child process that builds the
model (seeded random weights, no download), runs the part once to warm up and then ``--reps``
times; the figure is the median time and the peak RSS above the RSS before the part ran (glibc's
mmap threshold fixed, as tools/bench_fullsize.py does, so freed tensors leave RSS).  One JSON
line per part, then the per-preview total for ``--prompts`` prompts and ``--sampler-steps``
and what it costs in training steps: the ``step`` part times one training step of the same
U-Net in memory mode ``--mode`` (faithful: the paper's) at ``--train-size`` with gradient
checkpointing, batch 1, in the same run, by default at the paper's 512 px (about 19 GB of RAM
for ``faithful``; ``--train-size 256`` or a leaner ``--mode`` where that does not fit: a smaller
step makes the ratio an upper bound of the paper's).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import comfy_ready, eps_fn, make_unet, mode_trainer  # noqa: E402

CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _rss() -> float:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed(run, reps: int, grad: bool = False) -> dict:
    import torch

    with torch.set_grad_enabled(grad):
        run()  # warm-up
        before = _rss()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "peak_gb_above": max(peak - before, 0) / 1e9}


def child(part: str, tiny: bool, size: int, reps: int, mode: str) -> dict:
    import torch

    comfy_ready(cpu=True)
    torch.manual_seed(0)
    side = size // 8
    if part == "step":
        trainer = mode_trainer(make_unet(tiny), mode, latent=side)
        with trainer.running():
            return _timed(trainer.step, reps, grad=True)
    if part == "unet":
        from lipschitz_personalize.trainer.delta import ParameterDelta

        unet = make_unet(tiny)
        delta, eps = ParameterDelta(unet), eps_fn(unet)  # the delta hooks the preview samples through
        x, t, c = torch.randn(2, 4, side, side), torch.full((2,), 500.0), torch.randn(2, 77, 768)
        with delta.applied():
            return _timed(lambda: eps(x, t, c), reps)
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4).eval()
    z = torch.randn(1, 4, side, side)
    return _timed(lambda: vae.decode(z), reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the test U-Net instead of the full-size one")
    ap.add_argument("--size", type=int, default=256, help="preview size in pixels (the node's default)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--sampler-steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mode", default="faithful", help="memory mode of the training step compared with")
    ap.add_argument("--train-size", type=int, default=512, help="training resolution of that step, in pixels")
    ap.add_argument("--child", choices=("unet", "vae", "step"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tiny, args.size, args.reps, args.mode)))
        return
    model = "test U-Net (25.8M)" if args.tiny else "full-size SD1.5 U-Net (859.5M)"
    parts = {}
    for part, size in (("unet", args.size), ("vae", args.size), ("step", args.train_size)):
        cmd = [sys.executable, __file__, "--child", part, "--size", str(size), "--reps", str(args.reps),
               "--mode", args.mode]
        out = subprocess.run(cmd + (["--tiny"] if args.tiny else []), env=CHILD_ENV, check=True,
                             capture_output=True, text=True).stdout
        parts[part] = json.loads(out.strip().splitlines()[-1])
        what = {"unet": f"{model} forward, CFG batch 2, delta applied, no grad",
                "vae": "SD1.5 VAE decode, batch 1",
                "step": f"{model} training step, {args.mode}, batch 1, gradient checkpointing"}[part]
        print(json.dumps({"part": part, "size": size, "what": what, **parts[part]}))
    per_prompt = args.sampler_steps * parts["unet"]["seconds"] + parts["vae"]["seconds"]
    seconds = args.prompts * per_prompt
    print(json.dumps({"part": "preview", "size": args.size, "prompts": args.prompts, "sampler_steps": args.sampler_steps,
                      "model": model, "seconds": seconds,
                      "peak_gb_above": max(parts["unet"]["peak_gb_above"], parts["vae"]["peak_gb_above"]),
                      "training_steps": seconds / parts["step"]["seconds"], "mode": args.mode,
                      "train_size": args.train_size,
                      "date": time.strftime("%Y-%m-%d"), "device": "cpu",
                      "command": " ".join(["python tools/bench_preview.py", *sys.argv[1:]])}))


if __name__ == "__main__":
    main()
