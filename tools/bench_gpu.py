#!/usr/bin/env python3
"""GPU benchmark: the real SD1.5 U-Net shape (random weights, no download), 512 px, batch 1.

    python tools/bench_gpu.py                       # what `make bench-gpu` runs (needs CUDA)
    python tools/bench_gpu.py --device cpu --tiny --steps 2 --warmup 1   # dry run of the code path

ComfyUI's ``UNetModel`` with the SD1.5 configuration (859.5M parameters) at 64x64 latents.
For each mode it prints one JSON line: steps/s, seconds per 1000 steps and peak memory
(``torch.cuda.max_memory_allocated`` from before the model is built, so it counts the base
weights, deltas, Adam state, gradients and activations; ``reserved`` is what the caching
allocator held).  Modes:

* ``faithful`` - the paper's run: fp32, gradient checkpointing, torch's default Adam.
* ``faithful_lean`` - the same maths (bitwise on CPU) with Adam stepped inside backward.
* ``fast`` - bf16 base weights (as a half-precision checkpoint loads) and bf16 compute with
  fp32 deltas, fused Adam, no checkpointing.
* ``fast_lean`` - bf16 base and compute, fused Adam stepped inside backward, checkpointing.

Targets (H100): faithful <= 18 GB, the fastest mode <= 12 GB and <= 45 s per 1000 steps.
Exits with status 2 and a message when ``--device cuda`` has no CUDA device.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES: dict[str, dict[str, Any]] = {
    "faithful": dict(checkpointing=True),
    "faithful_lean": dict(checkpointing=True, step_in_backward=True),
    "fast": dict(half_base=True, checkpointing=False, precision="bf16", adam="fused"),
    "fast_lean": dict(half_base=True, checkpointing=True, precision="bf16", adam="fused", step_in_backward=True),
}
TARGETS = {"faithful": {"peak_gb": 18.0}, "fastest": {"peak_gb": 12.0, "s_per_1000": 45.0}}


def run_mode(name: str, spec: dict[str, Any], args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch
    from bench_models import make_trainer, make_unet

    spec = dict(spec)
    half_base = spec.pop("half_base", False)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    unet = make_unet(tiny=args.tiny, device=device)
    if half_base:
        unet = unet.to(torch.bfloat16)
    trainer = make_trainer(unet, args.latent, **spec)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        trainer.step()
    sync()
    t0 = time.perf_counter()
    last = None
    for _ in range(args.steps):
        last = trainer.step()
    sync()
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "mode": name, "device": torch.cuda.get_device_name() if cuda else device,
        "steps_per_s": round(args.steps / seconds, 3), "s_per_1000": round(1000 * seconds / args.steps, 1),
        "loss": None if last is None else round(last.loss, 5), "options": {**spec, "half_base": half_base},
        "latent": args.latent, "tiny": args.tiny, "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
    }
    if cuda:
        out["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        out["reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    del trainer, unet, last
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the small SD15-detected U-Net (dry runs)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = p.parse_args(argv)

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device is available (torch.cuda.is_available() is False). "
              "Run it on a machine with an NVIDIA GPU, or dry-run the code path with "
              "`python tools/bench_gpu.py --device cpu --tiny`.", file=sys.stderr)
        return 2
    from bench_models import comfy_ready
    comfy_ready(cpu=not args.device.startswith("cuda"))
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the faithful mode is real fp32
        torch.backends.cudnn.allow_tf32 = False
    print(json.dumps({"bench": "gpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                      "device": args.device, "latent": args.latent, "steps": args.steps, "tiny": args.tiny}), flush=True)
    results = []
    for name in args.modes:
        try:
            results.append(run_mode(name, MODES[name], args, args.device))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report and go on
            results.append({"mode": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
        print(json.dumps(results[-1]), flush=True)
    ok = [r for r in results if "error" not in r]
    faithful = next((r for r in ok if r["mode"] == "faithful"), None)
    fastest = min((r for r in ok if r["mode"].startswith("fast")), key=lambda r: r["s_per_1000"], default=None)
    if args.device.startswith("cuda"):
        summary: dict[str, Any] = {"summary": True}
        if faithful:
            summary["faithful_peak_gb"] = faithful["peak_gb"]
            summary["faithful_met"] = faithful["peak_gb"] <= TARGETS["faithful"]["peak_gb"]
        if fastest:
            summary.update(fastest_mode=fastest["mode"], fastest_s_per_1000=fastest["s_per_1000"],
                           fastest_peak_gb=fastest["peak_gb"],
                           fastest_met=fastest["peak_gb"] <= TARGETS["fastest"]["peak_gb"]
                           and fastest["s_per_1000"] <= TARGETS["fastest"]["s_per_1000"])
        print(json.dumps(summary), flush=True)
    return 1 if len(ok) < len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
