#!/usr/bin/env python3
"""Full-size SD1.5 figures on this machine: the memory each mode holds and what a run writes to disk.

    python tools/bench_fullsize.py                  # what `make bench-fullsize` runs
    python tools/bench_fullsize.py --only peaks     # or: --only disk, --only sampling

**Peaks.** For each memory mode (:mod:`trainer.memory`) a fresh process builds ComfyUI's SD1.5
``UNetModel`` at full size with its anchor in the mode's dtype (fp32, the checkpoint's values,
for ``faithful``/``lean``; fp16, as ComfyUI stores SD1.5 on a GPU, for ``12gb``/``8gb``) and
trains 2 steps (the second holds the whole optimizer state) at 256 and at 384 px.  The figure is
the process's peak RSS minus its RSS before the U-Net was built (no CLIP, no VAE loaded): the
anchor, delta, gradients, Adam state and activations.  512 px does not fit in this machine's
RAM beside the faithful state, so ``peak_gb_<mode>`` extrapolates the activation term, linear in
the pixel count, from the two measured sizes (the line's ``method`` says so).  The children run
with a fixed glibc mmap threshold so that RSS counts live tensors, not freed heap; targets: faithful
18, lean 14.5, 12gb 11, 8gb 7.2 GB.  Each line also carries the pre-flight estimate
(:func:`trainer.memory.estimate`) for the same run.

**Sampling.** ``patch_loss_fp16_*``: how much of a trained delta ComfyUI's diff patch loses
where it stores the U-Net in fp16 (GPUs), ``||applied - delta|| / ||delta||``
(``nodes/host/patches.py`` ``patch_loss``): the test U-Net after 20, 200 and 500 steps at the
paper's lr and lambda, and the full-size one after the disk section's 2 steps.

**Disk.** The full-size U-Net (859.5M parameters, random seeded weights, no download) trains 2 steps at 64 px on the CPU with Adam stepped in backward (the same delta and
moments as the default update, one parameter-sized buffer less), then the pack's own writer
(``trainer/files/delta_file.py``) saves the finished run and the stopped run in the default
``delta_dtype`` into a temporary folder.  One JSON line per figure: ``disk_gb_finished`` and
``disk_gb_stopped`` (targets 1.8 and 3.6 GB), and the same for ``delta_dtype=fp32``.  The
figures are also recorded in ``docs/bench_fullsize.json`` (with date and command), from which
``tools/render_docs.py`` writes the table in docs/performance.md.  Needs about 20 GB of free RAM
(the faithful run at 384 px) and, on 2 cores, about half an hour.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import REPO_ROOT, comfy_ready, make_trainer, make_unet, mode_trainer  # noqa: E402

TARGETS = {"disk_gb_finished": 1.8, "disk_gb_stopped": 3.6,
           "peak_gb_faithful": 18.0, "peak_gb_lean": 14.5, "peak_gb_12gb": 11.0, "peak_gb_8gb": 7.2}
MEASURED_PX = (256, 384)
# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so RSS would
# count memory the training already gave back (1.3 GB more for 8gb at 64 px); a fixed 64 KiB
# threshold returns every tensor-sized block to the system when it is freed.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
TARGET_PX = 512
RECORD = REPO_ROOT / "docs" / "bench_fullsize.json"
EMITTED: dict[str, dict] = {}


def emit(name: str, value: float, unit: str, **extra) -> None:
    line = {"name": name, "value": round(value, 3), "unit": unit, **extra}
    if name in TARGETS:
        line.update(target=TARGETS[name], met=value <= TARGETS[name])
    print(json.dumps(line), flush=True)
    EMITTED[name] = line


def record(argv: list[str]) -> None:
    """Merge the figures into docs/bench_fullsize.json and re-render the docs' tables."""
    from render_docs import record_figures

    record_figures(RECORD, EMITTED, {"date": time.strftime("%Y-%m-%d"), "machine": "CPU",
                                     "command": " ".join(["python tools/bench_fullsize.py", *argv])})


def _rss() -> int:
    """This process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_child(mode: str, px: int, anchor_name: str) -> None:
    """In a fresh process: train 2 steps of ``mode`` at ``px`` with the anchor in
    ``anchor_name`` (fp32 or fp16) and print the peak it added."""
    import torch

    comfy_ready(cpu=True)
    torch.set_grad_enabled(True)
    before = _rss()
    anchor = {"fp32": torch.float32, "fp16": torch.float16}[anchor_name]
    unet = make_unet(tiny=False, dtype=anchor)
    trainer = mode_trainer(unet, mode, px // 8)
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    sizes = [p.numel() for p in unet.parameters()]
    print(json.dumps({"peak_gb": (peak - before) / 1e9, "s_per_step": (time.perf_counter() - t0) / 2,
                      "anchor": str(anchor).removeprefix("torch."), "params": sum(sizes), "largest": max(sizes),
                      "anchor_bytes": anchor.itemsize}), flush=True)


def peaks(modes: list[str], fp16_checkpoint: bool = False) -> None:
    """``peak_gb_<mode>`` at 512 px from the two measured sizes, and the measured points
    (``fp16_checkpoint``: ``faithful``/``lean`` anchored on an fp16 file's values, named
    ``peak_gb_<mode>_fp16_checkpoint``)."""
    from lipschitz_personalize.trainer.memory import MODES

    small, large = MEASURED_PX
    for mode in modes:
        checkpoint = MODES[mode].anchor == "checkpoint"
        anchor = "fp32" if checkpoint and not fp16_checkpoint else "fp16"
        name = f"peak_gb_{mode}" + ("_fp16_checkpoint" if checkpoint and fp16_checkpoint else "")
        TARGETS.setdefault(name, TARGETS[f"peak_gb_{mode}"])
        points = {}
        for px in MEASURED_PX:
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(px), anchor], capture_output=True,
                                 text=True, check=True, env=CHILD_ENV).stdout
            points[px] = json.loads(out.strip().splitlines()[-1])
            emit(f"{name}_{px}", points[px]["peak_gb"], "GB", estimate_gb=_estimate_gb(mode, px, points[px]),
                 s_per_step=round(points[px]["s_per_step"], 1),
                 method=f"peak RSS - RSS before the U-Net, 2 steps at {px} px, anchor {points[px]['anchor']}")
        slope = (points[large]["peak_gb"] - points[small]["peak_gb"]) / (large**2 - small**2)
        value = points[large]["peak_gb"] + slope * (TARGET_PX**2 - large**2)
        emit(name, value, "GB", estimate_gb=_estimate_gb(mode, TARGET_PX, points[large]),
             method=f"{TARGET_PX} px extrapolated (activations linear in pixels) from peak RSS - RSS before "
                    f"the U-Net at {small} and {large} px, 2 steps, anchor {points[large]['anchor']}, CPU")


def _estimate_gb(mode: str, px: int, child: dict) -> float:
    """The pre-flight estimate (:func:`trainer.memory.estimate`) of the same run."""
    from lipschitz_personalize.trainer.memory import estimate

    return round(estimate(mode, child["params"], child["largest"], child["anchor_bytes"], px).total / 1e9, 2)


def disk() -> None:
    import torch

    comfy_ready(cpu=True)
    from lipschitz_personalize.nodes.host import patches as host_patches
    from lipschitz_personalize.trainer.files import delta_file

    unet = make_unet(tiny=False)
    params = sum(p.numel() for p in unet.parameters())
    trainer = make_trainer(unet, latent=8, steps=2, step_in_backward=True)
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.step()
    print(json.dumps({"bench": "fullsize", "date": time.strftime("%Y-%m-%d"), "params": params,
                      "train_s": round(time.perf_counter() - t0, 1)}), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fullsize-") as tmp:
        for dtype_name in ("fp16", "fp32"):
            dtype = delta_file.DELTA_DTYPES[dtype_name]
            delta = delta_file.TrainedDelta(trainer.delta.state_dict(dtype), {"steps_done": "2"})
            finished = delta_file.save_delta_file(Path(tmp) / f"auto_{dtype_name}.safetensors", delta)
            stopped = delta_file.save_delta_file(Path(tmp) / f"partial_{dtype_name}.safetensors", delta, None,
                                                 trainer.state_dict(with_delta=False),
                                                 delta_file.moment_format(dtype_name))
            suffix = "" if dtype_name == delta_file.DEFAULT_DELTA_DTYPE else f"_{dtype_name}"
            method = f"bytes on disk of the pack's writer, delta_dtype={dtype_name}, {params} parameters"
            emit(f"disk_gb_finished{suffix}", finished.stat().st_size / 1e9, "GB", method=method)
            emit(f"disk_gb_stopped{suffix}", stopped.stat().st_size / 1e9, "GB", method=method,
                 moments=delta_file.moment_format(dtype_name))
            finished.unlink()
            stopped.unlink()
    emit("patch_loss_fp16_fullsize", host_patches.patch_loss(unet, trainer.delta.state_dict(), torch.float16), "ratio",
         method="||applied - delta|| / ||delta|| of ComfyUI's diff patch on the fp16-stored full-size U-Net "
                "(random weights) after 2 steps at lr 2e-6 (sampled estimate)")


def sampling() -> None:
    """How much of a trained delta ComfyUI's diff patch keeps where it stores the U-Net in fp16
    (GPUs): the test model trained at the paper's lr and lambda, at three lengths."""
    import torch

    comfy_ready(cpu=True)
    from lipschitz_personalize.nodes.host import patches as host_patches

    unet = make_unet(tiny=True)
    lengths = (20, 200, 500)  # 1000, the paper's, takes ~15 min on 2 cores: not in the default bench
    trainer = make_trainer(unet, latent=8, steps=1000)
    for step in range(1, lengths[-1] + 1):
        trainer.step()
        if step in lengths:
            delta = trainer.delta.state_dict()
            emit(f"patch_loss_fp16_tiny_{step}", host_patches.patch_loss(unet, delta, torch.float16), "ratio",
                 delta_rms=float(torch.cat([d.reshape(-1) for d in delta.values()]).square().mean().sqrt()),
                 method=f"||applied - delta|| / ||delta|| of ComfyUI's diff patch on the fp16-stored test U-Net "
                        f"(25.8M, random weights) after {step} steps at lr 2e-6, lambda 500 (sampled estimate)")


def main(argv: list[str] | None = None) -> int:
    from lipschitz_personalize.trainer.memory import MODES, ORDER

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("peaks", "disk", "sampling"))
    p.add_argument("--modes", nargs="+", choices=ORDER, default=list(ORDER))
    p.add_argument("--fp16-checkpoint", action="store_true",
                   help="anchor faithful and lean on fp16 values (the fp16 checkpoint file) instead of fp32")
    p.add_argument("--child", nargs="+", metavar="MODE PX [ANCHOR]", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.child:
        mode, px, *anchor = args.child
        peak_child(mode, int(px), anchor[0] if anchor else "fp32" if MODES[mode].anchor == "checkpoint" else "fp16")
        return 0
    if args.only in (None, "peaks"):
        peaks(args.modes, args.fp16_checkpoint)
    if args.only in (None, "disk"):
        disk()
    if args.only in (None, "sampling"):
        sampling()
    record(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
