#!/usr/bin/env python3
"""GPU benchmark of the memory modes on the full-size SD1.5 U-Net (random weights, no download).

    python tools/bench_gpu.py                 # what `make bench-gpu` runs (needs CUDA)
    python tools/bench_gpu.py --device cpu --tiny --latents 8 --steps 2 --warmup 1 --caps   # dry run
    python tools/bench_gpu.py --check         # the prepared GPU check, <= 7 min on one H100
    python tools/bench_gpu.py --dry-run       # the check on the CPU (tests/test_bench_gpu.py)

ComfyUI's ``UNetModel`` with the SD1.5 configuration (859.5M parameters), batch 1, gradient
checkpointing, lambda 500, lr 2e-6.  For every memory mode (:mod:`trainer.memory`) it prints one
JSON line per figure, ``{"name", "value", "unit", ...}``:

* ``gpu_s_per_1000_<mode>`` - seconds per 1000 steps at the largest latent (64 = 512 px);
* ``gpu_peak_gb_<mode>`` - ``torch.cuda.max_memory_allocated`` over that run, counted from an
  empty device (anchor, delta, gradients, Adam state, activations, kernel workspaces);
* ``gpu_peak_gb_<mode>_<px>`` - the same at the smaller latents (the activation slope);
* ``gpu_fits_<mode>`` - the smallest card of 8/12/16/24 GB the mode ran on: the caching
  allocator capped at 92% of the card (what a card leaves after the CUDA context and a desktop)
  with ``torch.cuda.set_per_process_memory_fraction`` for 3 steps;
* ``gpu_cosine_<mode>`` and ``gpu_rel_diff_<mode>`` - after the same steps on the same data, the
  cosine between the mode's delta and ``faithful``'s and ``||d - d_faithful|| / ||d_faithful||``;
  ``gpu_rel_diff_faithful_default_adam`` compares the fused kernel with torch's default Adam.

The anchor is what the mode says: the fp32 weights for ``faithful``/``lean``, the fp16 model (as
ComfyUI stores SD1.5 on a GPU) for ``12gb``/``8gb``.  TF32 is what each run's config states
(:mod:`trainer.precision`): off, strict fp32, unless a probe asks for ``{"tf32": true}``.
``--check`` is the prepared GPU check (:mod:`gpu_check`; ``--dry-run``: on the CPU).
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

CARDS_GB = (8, 12, 16, 24)
# --probes: the faithful run with one ingredient of the compact modes at a time, to attribute
# their deviation (and faithful again: the GPU's run-to-run noise floor).
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "faithful_repeat": ("faithful", {}),
    "faithful_bf16_compute": ("faithful", dict(precision="bf16")),
    "faithful_fp16_anchor": ("faithful", dict(anchor="fp16")),
    "faithful_bf16_moments": ("faithful", dict(adam="default", moments="bf16")),
    "faithful_fp8_moments": ("faithful", dict(adam="default", moments="fp8")),
    "faithful_bf16_delta": ("faithful", dict(adam="default", delta_precision="bf16")),
}
USABLE = 0.92


def emit(name: str, value: Any, unit: str, sink=None, **extra: Any) -> None:
    """One figure as a JSON line on stdout (and in ``sink``, a file, where given)."""
    line = json.dumps({"name": name, "value": value, "unit": unit, **extra})
    print(line, flush=True)
    if sink is not None:
        sink.write(line + "\n")
        sink.flush()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from bench_models import make_unet

        self.args, self.torch = args, torch
        self.cuda = args.device.startswith("cuda")
        # One set of random weights (built on the CPU once), copied into each run's U-Net.
        self.weights = {k: v.clone() for k, v in make_unet(tiny=args.tiny, device="cpu").state_dict().items()}

    def _reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def trainer(self, mode: str, latent: int, anchor: str | None = None, **overrides: Any):
        """A trainer of ``mode`` on a fresh U-Net holding the benchmark's weights, stored as the
        anchor ``mode`` says (the fp16 model as ComfyUI stores SD1.5 on a GPU, or fp32)."""
        torch = self.torch
        from bench_models import make_unet, mode_trainer
        from lipschitz_personalize.trainer.memory import MODES

        unet = make_unet(tiny=self.args.tiny, device=self.args.device, init=False)
        unet.load_state_dict(self.weights)
        if anchor is None:
            anchor = "fp16" if MODES[mode].anchor == "model" and self.cuda else "fp32"
        unet = unet.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[anchor])
        return mode_trainer(unet, mode, latent, **overrides)

    def run(self, mode: str, latent: int, steps: int, warmup: int, anchor: str | None = None,
            **overrides: Any) -> dict[str, Any]:
        """Train ``steps`` (+ ``warmup``) steps of ``mode``; time, peak and the final delta."""
        torch = self.torch
        from lipschitz_personalize.trainer.precision import tf32_as_configured

        self._reset()
        trainer = self.trainer(mode, latent, anchor, **overrides)
        delta = trainer.delta
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        with tf32_as_configured(trainer.config.tf32):
            for _ in range(warmup):
                trainer.step()
            sync()
            resident = torch.cuda.memory_allocated() / 1e9 if self.cuda else None
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            sync()
        seconds = time.perf_counter() - start
        out = {"s_per_step": seconds / max(steps, 1),
               "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None,
               "resident_gb": resident,
               "delta": delta.state_dict(torch.float32)}
        del trainer, delta
        self._reset()
        return out

    def fits(self, mode: str, latent: int) -> tuple[int | None, float | None]:
        """The smallest card (GB) the mode trains on for 3 steps, and the peak there (the
        kernels' workspaces then take what the cap leaves, not what an 80 GB card offers)."""
        torch = self.torch
        total = torch.cuda.get_device_properties(0).total_memory
        for card in CARDS_GB:
            torch.cuda.set_per_process_memory_fraction(min(1.0, card * 1e9 * USABLE / total))
            try:
                return card, self.run(mode, latent, steps=1, warmup=2)["peak_gb"]
            except torch.OutOfMemoryError:
                self._reset()
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
        return None, None


def _probe(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    name, mode, options = text.split(":", 2)
    return name, (mode, json.loads(options))


def compare(delta: dict, reference: dict) -> tuple[float, float]:
    """(cosine, relative distance) of two deltas over all tensors."""
    dot = sum(float((delta[k].double() * reference[k].double()).sum()) for k in reference)
    na = sum(float(delta[k].double().square().sum()) for k in reference) ** 0.5
    nb = sum(float(reference[k].double().square().sum()) for k in reference) ** 0.5
    diff = sum(float((delta[k].double() - reference[k].double()).square().sum()) for k in reference) ** 0.5
    return dot / (na * nb), diff / nb


def main(argv: list[str] | None = None) -> int:
    import bench_models  # noqa: F401 - puts the repository on sys.path
    from lipschitz_personalize.trainer.memory import ORDER

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the small SD15-detected U-Net (dry runs)")
    p.add_argument("--latents", type=int, nargs="+", default=[32, 48, 64], help="latent sides; the last is timed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", nargs="+", choices=ORDER, default=list(ORDER))
    p.add_argument("--caps", action="store_true", help="also find the smallest card each mode fits (CUDA only)")
    p.add_argument("--probes", action="store_true", help="attribute the compact modes' deviation (see PROBES)")
    p.add_argument("--probe", type=_probe, nargs="*", default=[],
                   help='probes of your own instead of PROBES, NAME:MODE:JSON (e.g. 12gb_fp32:12gb:{"precision": "fp32"})')
    p.add_argument("--check", action="store_true",
                   help="the prepared GPU check (tools/gpu_check.py): per mode and compute, step and phase times, "
                        "launches, syncs, peak memory, distance from faithful; JSON lines also to --out")
    p.add_argument("--dry-run", action="store_true",
                   help="--check on the CPU with the tiny U-Net at 64 px, 2 steps (one profiled, one timed), no budget "
                        "(what the tests run)")
    p.add_argument("--computes", nargs="+", choices=["fp32", "tf32", "bf16"], default=["fp32", "tf32", "bf16"])
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="--check: start no configuration after this many seconds (the whole check stays under 7 min)")
    p.add_argument("--out", type=Path, help="--check: the JSON lines file (default docs/gpu/check_<date>.jsonl)")
    args = p.parse_args(argv)
    args.probe = dict(args.probe)
    if args.dry_run:
        args.check, args.device, args.tiny, args.latents, args.steps, args.warmup = True, "cpu", True, [8], 2, 0
        args.budget_s = float("inf")

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device is available (torch.cuda.is_available() is False). "
              "Run it on a machine with an NVIDIA GPU, or dry-run the code path with "
              "`python tools/bench_gpu.py --device cpu --tiny --latents 8`.", file=sys.stderr)
        return 2
    from bench_models import comfy_ready
    comfy_ready(cpu=not args.device.startswith("cuda"))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    meta = {"device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny}
    bench = Bench(args)
    if args.check:
        import gpu_check

        out = args.out or Path(__file__).resolve().parent.parent / "docs" / "gpu" / f"check_{meta['date']}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as sink:
            def to_both(*a: Any, **k: Any) -> None:
                emit(*a, sink=sink, **k)
            return gpu_check.check(bench, args, to_both, compare,
                                   {**meta, "dry_run": args.dry_run, "command": "python tools/bench_gpu.py "
                                    + " ".join(argv if argv is not None else sys.argv[1:])})
    timed = args.latents[-1]
    px = timed * 8
    reference = None
    failed = 0
    for mode in args.modes:
        try:
            for latent in args.latents[:-1]:
                r = bench.run(mode, latent, steps=1, warmup=2)
                if r["peak_gb"] is not None:
                    emit(f"gpu_peak_gb_{mode}_{latent * 8}", round(r["peak_gb"], 2), "GB",
                         resident_between_steps_gb=round(r["resident_gb"], 2), **meta)
            r = bench.run(mode, timed, args.steps, args.warmup)
            emit(f"gpu_s_per_1000_{mode}", round(1000 * r["s_per_step"], 1), "s", px=px, **meta)
            if r["peak_gb"] is not None:
                emit(f"gpu_peak_gb_{mode}", round(r["peak_gb"], 2), "GB", px=px,
                     resident_between_steps_gb=round(r["resident_gb"], 2), **meta)
            if mode == "faithful":
                reference = r["delta"]
                d = bench.run(mode, timed, args.steps, args.warmup, adam="default")["delta"]
                emit("gpu_rel_diff_faithful_default_adam", compare(d, reference)[1], "ratio",
                     steps=args.steps + args.warmup, **meta)
                # Which ingredient of a compact mode makes its deviation (PROBES, or --probe's own).
                for name, (base, variant) in (args.probe or PROBES).items() if args.probes or args.probe else ():
                    d = bench.run(base, timed, args.steps, args.warmup, **variant)["delta"]
                    cos, rel = compare(d, reference)
                    emit(f"gpu_cosine_{name}", round(cos, 6), "cosine", steps=args.steps + args.warmup,
                         rel_diff=rel, options=variant, **meta)
            elif reference is not None:
                cos, rel = compare(r["delta"], reference)
                emit(f"gpu_cosine_{mode}", round(cos, 6), "cosine", steps=args.steps + args.warmup, **meta)
                emit(f"gpu_rel_diff_{mode}", rel, "ratio", steps=args.steps + args.warmup, **meta)
            if args.caps and bench.cuda:
                card, peak = bench.fits(mode, timed)
                emit(f"gpu_fits_{mode}", card, "GB card", px=px, usable=USABLE, **meta)
                emit(f"gpu_peak_gb_{mode}_capped", None if peak is None else round(peak, 2), "GB", px=px,
                     cap_gb=None if card is None else round(card * USABLE, 2), **meta)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report and go on
            failed += 1
            emit(f"gpu_error_{mode}", f"{type(exc).__name__}: {exc}"[:400], "text", **meta)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
