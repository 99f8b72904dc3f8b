#!/usr/bin/env python3
"""Export a delta file as a kohya-format LoRA without ComfyUI (what ``LipschitzExtractLoRA`` does).

    python tools/extract_lora.py models/lipschitz_deltas/sks_dog_00001.safetensors --rank 16 --out sks_dog.safetensors

Prints one line per tensor factored and, at the end, the rank, file size and relative Frobenius
error ``||delta - LoRA|| / ||delta||``.  ``--keep-1d`` also stores biases and norms (ComfyUI
applies them; diffusers then refuses the file).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import add_to_sys_path  # noqa: E402

add_to_sys_path()  # the pack as lipschitz_personalize

import torch  # noqa: E402

from lipschitz_personalize.trainer.lora import delta_from_file, extract_lora, kohya_metadata, lora_nbytes  # noqa: E402
from lipschitz_personalize.trainer.persist import CorruptFileError, load_verified, save_verified  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("delta", type=Path, help="a delta file written by this pack (models/lipschitz_deltas)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    ap.add_argument("--keep-1d", action="store_true", help="store biases and norms as diff keys (ComfyUI only)")
    args = ap.parse_args(argv)
    if args.rank < 1:
        ap.error(f"--rank must be >= 1, got {args.rank}")
    try:
        tensors, meta = load_verified(args.delta)
        delta = delta_from_file(tensors)
    except (CorruptFileError, ValueError) as exc:
        ap.error(f"{args.delta}: {exc}")
    need = lora_nbytes([tuple(t.shape) for t in delta.values()], args.rank, torch.float16, args.keep_1d)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out.parent).free
    if free < need * 1.1:
        ap.error(f"--out: the LoRA needs about {need / 1e6:.0f} MB, {args.out.parent} has {free / 1e6:.0f} MB free")
    t0 = time.perf_counter()
    lora, stats = extract_lora(delta, args.rank, torch.float16, args.keep_1d,
                               lambda i, n, name: print(f"[{i}/{n}] {name}", flush=True))
    save_verified(args.out, lora, kohya_metadata(stats, args.delta.name, meta.get("base_fingerprint", "unknown")))
    print(f"{args.out}: rank {args.rank}, {args.out.stat().st_size / 1e6:.1f} MB, relative error {stats.rel_error:.4f}, "
          f"{stats.factored} weights factored, {len(stats.dropped)} biases/norms dropped "
          f"({stats.dropped_fraction:.2%} of the norm), {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
