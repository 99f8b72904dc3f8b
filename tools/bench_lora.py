#!/usr/bin/env python3
"""Export as LoRA, measured: file size and error by rank on a trained delta, and the full-size SVD time.

    python tools/bench_lora.py                    # writes docs/lora.json; tools/render_docs.py renders docs/lora.md
    python tools/bench_lora.py --only trained     # or --only fullsize: one section, the other kept from --out

**Trained delta.** The tiny test U-Net (``tools/bench_models.py`` ``SD15_TINY``, random seeded
weights) trains ``--steps`` steps at the paper's settings (lambda 500, Adam lr 2e-6, batch 1) on
random 8x8 latents; its delta, in fp16 as the delta file stores it, is exported at ranks 4, 16,
64 and 128 (:func:`trainer.lora.extract_lora`, biases and norms dropped, the default).  Per rank:
the written file's size and ``||delta - LoRA||_F / ||delta||_F`` over the whole delta.  From the
singular values of every weight: the smallest rank (the same for every weight) whose LoRA keeps
95% of the delta's Frobenius norm (``||LoRA|| >= 0.95 ||delta||``).
**Full size.** SD1.5's 686 U-Net tensors (282 weights factored) with a random delta of the
magnitude a few Adam steps leave (``N(0, 1) * 2e-6``, drawn one tensor at a time, so only the
output and one tensor's factors are held), exported at rank 16 on the CPU: the wall time and
the growth of the peak RSS.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(REPO_ROOT), str(REPO_ROOT / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import bench_models  # noqa: E402
from lipschitz_personalize.trainer.lora import extract_lora, kohya_metadata  # noqa: E402
from lipschitz_personalize.trainer.persist import save_verified  # noqa: E402

RANKS = (4, 16, 64, 128)
OUT = REPO_ROOT / "docs" / "lora.json"


def trained_delta(steps: int) -> dict[str, torch.Tensor]:
    unet = bench_models.make_unet(tiny=True)
    trainer = bench_models.make_trainer(unet, latent=8, steps=steps)
    for i in range(steps):
        trainer.step()
        if (i + 1) % 25 == 0:
            print(f"trained {i + 1}/{steps} steps", flush=True)
    return trainer.delta.state_dict(torch.float16)


def rank_keeping(delta: Mapping[str, torch.Tensor], fraction: float) -> int:
    """The smallest rank whose LoRA holds ``fraction`` of ``||delta||_F`` (1-D tensors dropped)."""
    total = sum(float(t.float().square().sum()) for t in delta.values())
    spectra = [torch.linalg.svdvals(t.reshape(t.shape[0], -1).double()).square() for t in delta.values() if t.dim() >= 2]
    for r in range(1, max(len(s) for s in spectra) + 1):
        if math.sqrt(sum(float(s[:r].sum()) for s in spectra) / total) >= fraction:
            return r
    raise ValueError(f"even full rank keeps less than {fraction:.0%} of the norm (biases and norms hold the rest)")


def by_rank(delta: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in RANKS:
            lora, stats = extract_lora(delta, rank)
            path = save_verified(Path(tmp) / f"r{rank}.safetensors", lora, kohya_metadata(stats, "bench", "bench"))
            rows.append({"rank": rank, "file_mb": path.stat().st_size / 1e6, "rel_error": stats.rel_error,
                         "dropped_norm_fraction": stats.dropped_fraction})
            print(json.dumps(rows[-1]), flush=True)
    return rows


class RandomDelta(Mapping):
    """A full-size delta drawn one tensor at a time, on demand (never held whole)."""

    def __init__(self, shapes: dict[str, torch.Size], scale: float) -> None:
        self.shapes, self.scale = shapes, scale

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(list(self.shapes).index(name))
        return (torch.randn(self.shapes[name], generator=g) * self.scale).half()

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def fullsize(rank: int = 16) -> dict:
    bench_models.comfy_ready(cpu=True)
    shapes = {n: p.shape for n, p in bench_models.make_unet(tiny=False, device="meta", init=False).named_parameters()}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    last = [t0]

    def progress(i: int, n: int, name: str) -> None:
        if time.perf_counter() - last[0] > 20 or i == n:
            last[0] = time.perf_counter()
            print(f"[{i}/{n}] {name} {last[0] - t0:.0f} s", flush=True)

    lora, stats = extract_lora(RandomDelta(shapes, 2e-6), rank, progress=progress)
    seconds = time.perf_counter() - t0
    peak_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return {"tensors": len(shapes), "factored": stats.factored, "rank": rank, "seconds": seconds,
            "lora_mb": stats.nbytes / 1e6, "peak_rss_growth_mb": peak_growth / 1e6,
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", choices=("trained", "fullsize"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (on a busy machine, 1: LAPACK's threads spin-wait on shared cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench_models.comfy_ready(cpu=True)
    result = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    run = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                     "machine": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
                     "command": "python tools/bench_lora.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))}
    if args.only != "fullsize":
        torch.manual_seed(0)
        delta = trained_delta(args.steps)
        result["trained"] = {"model": "tiny test U-Net (SD15_TINY)", "steps": args.steps, "lr": 2e-6, "lambda": 500.0,
                             "delta_mb_fp16": sum(t.numel() * 2 for t in delta.values()) / 1e6,
                             "ranks": by_rank(delta), "rank_for_95pct_norm": rank_keeping(delta, 0.95), "run": run}
        print(json.dumps(result["trained"]), flush=True)
    if args.only != "trained":
        result["fullsize"] = {**fullsize(), "run": run}
        print(json.dumps(result["fullsize"]), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
