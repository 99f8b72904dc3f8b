#!/usr/bin/env python3
"""CPU benchmark suite: one JSON line per figure, every figure a ratio measured in this run.

    python tools/bench.py                    # what `make bench` runs
    python tools/bench.py --only speed       # a subset: speed, memory, node, toy
    python tools/bench.py --memory-child '{"lam": 500}'   # internal: one memory run

Every figure is also merged into ``docs/bench_cpu.json`` (``--record``, on by default) with the
date, machine and command that measured it, and ``tools/render_docs.py`` then rewrites the
tables of README.md and docs/performance.md from that file: the docs quote the measurement,
never a number typed by hand.

The model is ComfyUI's ``UNetModel`` in the small SD15-detected configuration (25.8M
parameters, the tiny checkpoint's U-Net) with seeded random weights, at ``--latent`` (32)
latents, batch 1, fp32, gradient checkpointing on (the paper's and the node's default).

* speed: every configuration has its own trainer on the same base weights; they take one
  step each in round-robin for ``--warmup`` + ``--steps`` rounds, so machine noise hits them
  alike; a figure is ``median(step time of the option) / median(step time of the faithful
  default)`` (``reg_overhead``: faithful lambda=500 / the same with lambda=0).
* memory: each configuration in its own subprocess; ``peak RSS - RSS after imports``
  (``VmHWM``, reset after the imports: the true high-water mark), so it counts the model, deltas, Adam, grads and
  activations that training adds, not torch itself.
* node: ``LipschitzPersonalize`` through a real ComfyUI server (node wall time, from the
  websocket's ``executing`` messages) / the bare trainer loop for the same steps.
* toy: wall time of ``tools/toy``'s ``run_toy`` (the full toy reproduction, one seed).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import REPO_ROOT, comfy_ready  # noqa: E402

MACHINE = f"CPU, {os.cpu_count()} cores"
TARGETS = {"reg_overhead": 1.03, "reg_memory": 1.05, "ref_memory": 0.9, "node_overhead": 1.10, "toy_seconds": 180.0}
RECORD = REPO_ROOT / "docs" / "bench_cpu.json"
EMITTED: dict[str, dict] = {}


def emit(figure: str, value: float | None, **extra: Any) -> dict:
    line = {"figure": figure, "value": None if value is None else round(value, 4)}
    if figure in TARGETS and value is not None:
        line["target"] = TARGETS[figure]
        line["met"] = value <= TARGETS[figure]
    line.update(extra)
    print(json.dumps(line), flush=True)
    EMITTED[figure] = line
    return line


def record(argv: list[str]) -> None:
    """Merge this run's figures into docs/bench_cpu.json and re-render the docs' tables."""
    from render_docs import record_figures

    record_figures(RECORD, EMITTED, {"date": time.strftime("%Y-%m-%d"), "machine": MACHINE,
                                     "load_avg_1m": round(os.getloadavg()[0], 2),
                                     "command": "python tools/bench.py " + shlex.join(argv)})


# -- speed ----------------------------------------------------------------------------------
def speed(args: argparse.Namespace) -> None:
    from bench_models import ReferenceTrainer, copy_unet, make_trainer, make_unet

    unet = make_unet(tiny=True)
    lat = args.latent
    configs: dict[str, Callable[[], Callable[[], object]]] = {
        "faithful": lambda: make_trainer(unet, lat).step,
        "lambda0": lambda: make_trainer(unet, lat, lam=0.0).step,
        "paper_autograd": lambda: ReferenceTrainer(copy_unet(unet), lat).step,
        "no_checkpointing": lambda: make_trainer(unet, lat, checkpointing=False).step,
        "bf16": lambda: make_trainer(unet, lat, precision="bf16").step,
        "adam_foreach": lambda: make_trainer(unet, lat, adam="foreach").step,
        "adam_fused": lambda: make_trainer(unet, lat, adam="fused").step,
        "step_in_backward": lambda: make_trainer(unet, lat, step_in_backward=True).step,
    }
    steps: dict[str, Callable[[], object]] = {}
    for name, make in configs.items():
        try:
            steps[name] = make()
        except Exception as exc:  # noqa: BLE001 - an option that cannot run here is reported
            emit(name, None, error=f"{type(exc).__name__}: {exc}"[:300])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rnd in range(args.warmup + args.steps):
        order = list(steps)
        order = order[rnd % len(order):] + order[:rnd % len(order)]  # no configuration always first
        for name in order:
            t0 = time.perf_counter()
            try:
                steps[name]()
            except Exception as exc:  # noqa: BLE001
                emit(name, None, error=f"{type(exc).__name__}: {exc}"[:300])
                del steps[name]
                continue
            if rnd >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items() if ts}
    base = med["faithful"]
    common = dict(machine=MACHINE, latent=lat, steps=args.steps, unit="ratio")
    emit("reg_overhead", base / med["lambda0"], faithful_s=round(base, 3), lambda0_s=round(med["lambda0"], 3),
         **common)
    emit("paper_autograd_overhead", med["paper_autograd"] / med["lambda0"],
         note="the reference code's autograd regularizer loop / plain step", **common)
    for name in med:
        if name not in ("faithful", "lambda0", "paper_autograd"):
            emit(f"speed_{name}", med[name] / base, seconds=round(med[name], 3), faithful_s=round(base, 3),
                 note="option step / faithful step (lower is faster)", **common)


# -- memory ---------------------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    """Start the peak-RSS watermark (VmHWM) afresh; ``ru_maxrss`` would not do: it survives
    fork+exec, so a child started by a big parent reports the parent's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(spec: dict, latent: int, steps: int) -> None:
    """One training configuration in this (fresh) process; prints its added peak memory."""
    comfy_ready(cpu=True)
    import torch  # noqa: F401
    import lipschitz_personalize.trainer.loop  # noqa: F401
    from bench_models import ReferenceTrainer, make_trainer, make_unet

    import comfy.ldm.modules.diffusionmodules.openaimodel  # noqa: F401
    import gc
    gc.collect()
    _reset_peak()
    baseline = _status_bytes("VmRSS")
    unet = make_unet(tiny=True)
    spec = dict(spec)
    if spec.pop("reference", False):
        step = ReferenceTrainer(unet, latent, lam=spec.get("lam", 500.0)).step
    else:
        step = make_trainer(unet, latent, **spec).step
    for _ in range(steps):
        step()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"added_bytes": peak - baseline, "baseline_bytes": baseline}))


def _measure_memory(spec: dict, args: argparse.Namespace) -> int:
    # A fixed mmap threshold: every large tensor gets its own mapping and is unmapped when freed,
    # so RSS follows live memory instead of glibc's heap fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec), "--latent", str(args.latent),
                          "--memory-steps", str(args.memory_steps)], capture_output=True, text=True, check=False, env=env)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["added_bytes"]
    raise RuntimeError(f"memory run {spec} failed: {out.stderr[-2000:]}")


def memory(args: argparse.Namespace) -> None:
    specs = {
        "faithful": {"lam": 500.0},
        "lambda0": {"lam": 0.0},
        "reference": {"reference": True, "lam": 500.0},
        "step_in_backward": {"lam": 500.0, "step_in_backward": True},
        "no_checkpointing": {"lam": 500.0, "checkpointing": False},
        "bf16": {"lam": 500.0, "precision": "bf16"},
    }
    mb = {}
    for name, spec in specs.items():
        try:
            mb[name] = _measure_memory(spec, args) / 2**20
        except RuntimeError as exc:
            emit(f"memory_{name}", None, error=str(exc)[-300:])
    common = dict(machine=MACHINE, latent=args.latent, unit="ratio of added peak RSS")
    emit("reg_memory", mb["faithful"] / mb["lambda0"], faithful_mb=round(mb["faithful"]), lambda0_mb=round(mb["lambda0"]),
         **common)
    emit("ref_memory", mb["faithful"] / mb["reference"], faithful_mb=round(mb["faithful"]),
         reference_mb=round(mb["reference"]), **common)
    if "step_in_backward" in mb:
        emit("ref_memory_step_in_backward", mb["step_in_backward"] / mb["reference"],
             option_mb=round(mb["step_in_backward"]), reference_mb=round(mb["reference"]), **common)
    for name in ("no_checkpointing", "bf16", "step_in_backward"):
        if name in mb:
            emit(f"memory_{name}", mb[name] / mb["faithful"], option_mb=round(mb[name]),
                 faithful_mb=round(mb["faithful"]), **common)


WARM_STEPS = 3  # the first steps of a fresh trainer pay one-off allocation costs in both paths


# -- the node through a real server ------------------------------------------------------------
def node(args: argparse.Namespace) -> None:
    from bench_models import make_trainer, make_unet
    from comfy_server import ComfyServer

    from graphs import install_subject, loader

    steps, res = args.node_steps, args.latent * 8

    def bare() -> float:
        """Seconds per step of the bare loop after the same warm-up the node's timing skips."""
        trainer = make_trainer(make_unet(tiny=True), args.latent, steps=steps, lr=2e-6)
        for _ in range(WARM_STEPS):
            trainer.step()
        t0 = time.perf_counter()
        for _ in range(steps - WARM_STEPS):
            trainer.step()
        return (time.perf_counter() - t0) / (steps - WARM_STEPS)

    ckpt = REPO_ROOT / ".comfyui" / "models" / "tiny_sd15.safetensors"
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        server = ComfyServer(tmp)
        (server.checkpoints_dir / ckpt.name).symlink_to(ckpt)
        with server:
            install_subject(server.input_dir)
            graph = loader()
            graph["refs"]["inputs"]["resolution"] = res
            graph["train"] = {"class_type": "LipschitzPersonalize", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["refs", 0],
                "prompt": "a photo of sks dog", "lambda_reg": 500.0, "steps": steps, "learning_rate": 2e-6,
                "seed": 2025, "resolution": res, "preview_every": 0}}  # the training's cost, without previews
            # An output node, so the prompt runs (the node's own cost ends at its "executed").
            graph["save"] = {"class_type": "LipschitzSaveDelta",
                             "inputs": {"delta": ["train", 1], "filename_prefix": "bench"}}
            stamps: list[tuple[float, dict]] = []
            bare_before = bare()
            result = server.client.run(graph, timeout=7200,
                                       on_message=lambda m: stamps.append((time.perf_counter(), m)))
            bare_after = bare()
    if result.status != "success":
        emit("node_overhead", None, error=str(result.error)[:300])
        return
    starts = [t for t, m in stamps if m.get("type") == "executing" and (m.get("data") or {}).get("node") == "train"]
    ends = [t for t, m in stamps if t > starts[0] and m.get("type") == "executed"
            and (m.get("data") or {}).get("node") == "train"]
    ends = ends or [t for t, m in stamps if t > starts[0] and m.get("type") == "executing"
                    and (m.get("data") or {}).get("node") != "train"]
    events = [t for t, m in stamps if m.get("type") == "lipschitz.progress"]
    node_step = (events[-1] - events[WARM_STEPS - 1]) / (len(events) - WARM_STEPS)
    node_s = (ends[0] if ends else stamps[-1][0]) - starts[0]
    bare_step = (bare_before + bare_after) / 2
    emit("node_overhead", node_step / bare_step, node_step_s=round(node_step, 3), bare_step_s=round(bare_step, 3),
         bare_runs_step_s=[round(bare_before, 3), round(bare_after, 3)], node_total_s=round(node_s, 2),
         node_fixed_s=round(node_s - steps * node_step, 2), steps=steps, warm_steps=WARM_STEPS, resolution=res,
         machine=MACHINE, note="seconds per training step in the node (between its progress events) / in the bare "
                               f"loop, both after {WARM_STEPS} warm-up steps; node_fixed_s: the rest of the node's time")


# -- the toy --------------------------------------------------------------------------------
def toy(args: argparse.Namespace) -> None:
    from tools.toy.experiment import ToyConfig, run_toy

    with tempfile.TemporaryDirectory(prefix="bench-toy-") as tmp:
        t0 = time.perf_counter()
        run_toy(ToyConfig() if args.toy_full else ToyConfig(pretrain_epochs=200, finetune_epochs=500), tmp)
        seconds = time.perf_counter() - t0
    emit("toy_seconds", seconds, unit="s", machine=MACHINE, schedule="full (1000/5000 epochs)" if args.toy_full
         else "short (200/500 epochs, as tests/test_toy.py)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per configuration (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--node-steps", type=int, default=20)
    p.add_argument("--only", nargs="+", choices=["speed", "memory", "node", "toy"],
                   default=["speed", "memory", "node", "toy"])
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the figures into docs/bench_cpu.json and re-render the docs' tables")
    p.add_argument("--toy-full", action=argparse.BooleanOptionalAction, default=True,
                   help="the full toy schedule (--no-toy-full: the short test schedule)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child), args.latent, args.memory_steps)
        return 0
    comfy_ready(cpu=True)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"bench": "cpu", "date": time.strftime("%Y-%m-%d"), "machine": MACHINE,
                      "torch": torch.__version__, "latent": args.latent, "steps": args.steps,
                      "warmup": args.warmup}), flush=True)
    for part in args.only:
        {"speed": speed, "memory": memory, "node": node, "toy": toy}[part](args)
    if args.record:
        record(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
