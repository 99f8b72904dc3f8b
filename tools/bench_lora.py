#!/usr/bin/env python3
"""Export as LoRA, measured: size and error by rank on trained deltas, what the LoRAs draw on the micro-world, the full-size SVD time.

    python tools/bench_lora.py                    # writes docs/lora.json; tools/render_docs.py renders docs/lora.md
    python tools/bench_lora.py --only trained     # or microworld, or fullsize: one section, the others kept from --out

**Trained delta.** The tiny test U-Net (``tools/bench_models.py`` ``SD15_TINY``, random seeded
weights) trains ``--steps`` steps at the paper's settings (lambda 500, Adam lr 2e-6, batch 1) on
random 8x8 latents; its delta, in fp16 as the delta file stores it, is exported at ranks 4, 16,
64 and 128 (:func:`trainer.lora.extract_lora`, biases and norms dropped, the default).  Per rank:
the written file's size and ``||delta - LoRA||_F / ||delta||_F`` over the whole delta.  From the
singular values of every weight: the smallest rank (the same for every weight) whose LoRA keeps
95% of the delta's Frobenius norm (``||LoRA|| >= 0.95 ||delta||``).
**Micro-world** (docs/microworld.md; ``make microworld`` builds the checkpoint). Through a real
ComfyUI server, per seed k (0, 1, 2: trains and samples with k, as ``tools/microworld/sweep.py``
does): ``LipschitzPersonalize`` trains the subject at lambda 500 with the world's schedule
(``protocol.py``), ``LipschitzExtractLoRA`` exports its delta at the same ranks (biases and norms
dropped) and ``LipschitzSaveDelta`` writes the delta; each LoRA, loaded by stock
``LoraLoaderModelOnly`` on the base, is measured by the protocol (subject fidelity CLIP-I, drift,
concepts drawn as asked) next to the full delta (the node's MODEL) and the base. Per rank: the
file's size and relative error (its metadata); the rank keeping 95% of each seed's delta's norm.
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
import statistics
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


LAMBDA = 500.0


def microworld(seeds: tuple[int, ...], batch: int) -> dict:
    """The LoRAs of the micro-world subject's delta against the delta, per seed (module docstring)."""
    from lipschitz_personalize.trainer.lora import delta_from_file
    from lipschitz_personalize.trainer.persist import load_verified
    from safetensors import safe_open

    from tools.comfy_server import ComfyServer
    from tools.microworld import protocol, sweep

    trained = f"lambda {LAMBDA:g}"
    per_seed: dict[str, list[dict]] = {}
    files: dict[int, list[dict]] = {rank: [] for rank in RANKS}
    keeping, delta_mb = [], 0.0
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        protocol.install(server)
        for seed in seeds:
            models = {"base": None, trained: protocol.personalize(LAMBDA, seed)}
            scores, exported = protocol.run_with_loras(server, models, trained, RANKS, seed, batch=batch, save=True)
            sweep.record(per_seed, seed, scores)
            for rank, path in exported.loras.items():
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata()
                files[rank].append({"seed": seed, "file_mb": path.stat().st_size / 1e6,
                                    "rel_error": float(meta["rel_frobenius_error"]),
                                    "dropped_norm_fraction": float(meta["dropped_norm_fraction"])})
            delta = delta_from_file(load_verified(exported.delta)[0])
            delta_mb = sum(t.numel() * 2 for t in delta.values()) / 1e6
            keeping.append(rank_keeping(delta, 0.95))
            print(f"seed {seed}: {json.dumps({k: v[-1] for k, v in files.items()})}, 95% at rank {keeping[-1]}",
                  flush=True)
    return {"model": "micro-world U-Net (docs/microworld.md)", "trained": trained, "lambda": LAMBDA,
            "steps": protocol.STEPS, "lr": protocol.LR, "seeds": list(seeds), "batch": batch,
            "delta_mb_fp16": delta_mb,
            "ranks": [{"rank": rank, **{k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "seed"},
                       "per_seed": rows} for rank, rows in files.items()],
            "rank_for_95pct_norm": keeping, "per_seed": per_seed, "summary": sweep.summarize(per_seed)}


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
    ap.add_argument("--only", choices=("trained", "microworld", "fullsize"))
    ap.add_argument("--seeds", type=int, default=3, help="micro-world seeds 0..N-1 (training and sampling)")
    ap.add_argument("--batch", type=int, default=4, help="micro-world pictures per prompt and seed (the sweep's)")
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
    if args.only in (None, "trained"):
        torch.manual_seed(0)
        delta = trained_delta(args.steps)
        result["trained"] = {"model": "tiny test U-Net (SD15_TINY)", "steps": args.steps, "lr": 2e-6, "lambda": 500.0,
                             "delta_mb_fp16": sum(t.numel() * 2 for t in delta.values()) / 1e6,
                             "ranks": by_rank(delta), "rank_for_95pct_norm": rank_keeping(delta, 0.95), "run": run}
        print(json.dumps(result["trained"]), flush=True)
    if args.only in (None, "microworld"):
        result["microworld"] = {**microworld(tuple(range(args.seeds)), args.batch), "run": run}
        print(json.dumps(result["microworld"]["summary"]), flush=True)
    if args.only in (None, "fullsize"):
        result["fullsize"] = {**fullsize(), "run": run}
        print(json.dumps(result["fullsize"]), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
