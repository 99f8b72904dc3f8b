"""The prepared GPU check: where a training step's time goes, per memory mode and compute precision.

    python tools/bench_gpu.py --check            # one H100: about 5-7 min, writes docs/gpu/check_<date>.jsonl
    python tools/bench_gpu.py --check --dry-run  # the same code on the CPU with the tiny U-Net (the tests run it)

For every memory mode (:mod:`trainer.memory`) and compute precision (:data:`COMPUTES`: strict
fp32, fp32 with TF32 matmuls and convolutions, bf16 autocast) it trains ``--steps`` (20) steps
of the full-size SD1.5 U-Net at the last of ``--latents`` (64: 512 px) (batch 1, checkpointing, lambda 500, lr 2e-6, the anchor as
the mode says) from the same random weights and data, and writes one JSON line:

* ``step_s`` - median / min / max seconds of the timed steps (those after ``--warmup`` (3)
  warm-up steps and one profiled step), and ``phase_s``, the same per phase, from CUDA events recorded
  around the trainer's calls: ``forward`` (the U-Net's forward), ``backward`` (from the end of
  the forward to the optimizer step: the loss, the backward with its checkpoint recompute and,
  in the modes that step inside backward, their updates), ``update`` (the optimizer step after
  backward), ``metrics`` (the step's metrics up to their copy to the host);
* ``ops_per_step``, ``kernel_launches_per_step``, ``host_syncs_per_step`` - from
  ``torch.profiler`` over one step: aten ops, CUDA kernel launches and host synchronisations
  (``cuda*Synchronize`` calls; ``None`` on a CPU, which has neither);
* ``peak_allocated_gb`` - ``torch.cuda.max_memory_allocated`` over the run;
* ``rel_diff_vs_faithful_fp32`` and ``cosine_vs_faithful_fp32`` - the delta after all the
  steps against ``faithful``'s in strict fp32;
* ``tf32_flags`` - ``(matmul, cudnn)`` TF32 flags seen inside the forward: the precision the
  run stated (:mod:`trainer.precision`).

A configuration not reached within ``--budget-s`` gets a line with ``status`` saying so.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPUTES: dict[str, dict[str, Any]] = {"fp32": dict(precision="fp32", tf32=False),
                                       "tf32": dict(precision="fp32", tf32=True),
                                       "bf16": dict(precision="bf16", tf32=False)}
PHASES = ("forward", "backward", "update", "metrics")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no host sync to record one),
    ``perf_counter`` on a CPU, where every op is synchronous."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


def instrument(trainer, clock: Clock) -> dict[str, Any]:
    """Record marks around the trainer's forward, optimizer step and metrics into the
    returned dict (cleared by the caller before each step); a call the trainer does not
    make leaves its phase unmeasured."""
    marks: dict[str, Any] = {}

    def around(owner: object, attr: str, phase: str, on_call: Callable[[], None] = lambda: None) -> None:
        inner = getattr(owner, attr, None)
        if inner is None:
            return

        def wrapped(*args, **kwargs):
            marks.setdefault(f"{phase}_start", clock.mark())
            on_call()
            out = inner(*args, **kwargs)
            marks[f"{phase}_end"] = clock.mark()
            return out
        setattr(owner, attr, wrapped)

    from lipschitz_personalize.trainer.precision import tf32_flags
    around(trainer, "model_fn", "forward", lambda: marks.setdefault("tf32_flags", tf32_flags()))
    around(trainer.update, "step", "update")
    around(getattr(trainer, "regularizer", None), "measure", "metrics")
    return marks


def phases(marks: dict[str, Any], clock: Clock) -> dict[str, float | None]:
    """Seconds of each of :data:`PHASES` (and ``step``) from one step's marks."""
    spans = {"step": ("start", "end"), "forward": ("forward_start", "forward_end"),
             "backward": ("forward_end", "update_start"), "update": ("update_start", "update_end"),
             "metrics": ("metrics_start", "end")}
    return {name: clock.seconds(marks[a], marks[b]) if a in marks and b in marks else None
            for name, (a, b) in spans.items()}


def spread(values: list[float | None]) -> dict[str, float] | None:
    if not values or any(v is None for v in values):
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def profile_step(trainer, cuda: bool) -> dict[str, int | None]:
    """Aten ops, kernel launches and host syncs of one training step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return {"ops_per_step": sum(n.startswith("aten::") for n in names),
            "kernel_launches_per_step": sum(n in LAUNCHES for n in names) if cuda else None,
            "host_syncs_per_step": sum("Synchronize" in n for n in names if n.startswith("cuda")) if cuda else None}


def measure(bench, mode: str, compute: str, latent: int, steps: int, warmup: int) -> tuple[dict, dict]:
    """One configuration: its JSON fields and its final delta."""
    from lipschitz_personalize.trainer.precision import tf32_as_configured

    cuda = bench.cuda
    clock = Clock(cuda)
    bench._reset()
    trainer = bench.trainer(mode, latent, **COMPUTES[compute])
    marks = instrument(trainer, clock)
    with torch.inference_mode(False), torch.enable_grad(), tf32_as_configured(trainer.config.tf32):
        for _ in range(warmup):
            trainer.step()
        counts = profile_step(trainer, cuda)
        recorded = []
        for _ in range(steps - warmup - 1):
            marks.clear()
            marks["start"] = clock.mark()
            trainer.step()
            marks["end"] = clock.mark()
            recorded.append(dict(marks))
        if cuda:
            torch.cuda.synchronize()
    timed = [phases(m, clock) for m in recorded]
    fields = {"step_s": spread([t["step"] for t in timed]),
              "phase_s": {p: spread([t[p] for t in timed]) for p in PHASES},
              **counts,
              "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
              "tf32_flags": list(recorded[-1].get("tf32_flags", ())) if recorded else None}
    delta = trainer.delta.state_dict(torch.float32)
    del trainer
    bench._reset()
    return fields, delta


def check(bench, args: argparse.Namespace, emit: Callable[..., None], compare, meta: dict[str, Any]) -> int:
    """Every mode x compute of ``args``; the faithful strict-fp32 run first (the reference)."""
    started = time.perf_counter()
    reference = None
    failed = 0
    configs = [(m, c) for m in args.modes for c in args.computes]
    if ("faithful", "fp32") in configs:
        configs.remove(("faithful", "fp32"))
        configs.insert(0, ("faithful", "fp32"))
    latent = args.latents[-1]
    common = dict(px=latent * 8, steps=args.steps, warmup=args.warmup, **meta)
    for mode, compute in configs:
        name = f"gpu_check_{mode}_{compute}"
        if time.perf_counter() - started > args.budget_s:
            emit(name, None, "s", mode=mode, compute=compute, status=f"not measured: over the {args.budget_s} s budget",
                 **common)
            continue
        try:
            fields, delta = measure(bench, mode, compute, latent, args.steps, args.warmup)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report and go on
            failed += 1
            emit(name, None, "s", mode=mode, compute=compute, status=f"{type(exc).__name__}: {exc}"[:400], **common)
            continue
        if reference is None and (mode, compute) == ("faithful", "fp32"):
            reference = delta
        cos, rel = compare(delta, reference) if reference is not None else (None, None)
        emit(name, fields["step_s"]["median"] if fields["step_s"] else None, "s", mode=mode, compute=compute,
             status="measured", rel_diff_vs_faithful_fp32=rel, cosine_vs_faithful_fp32=cos, **fields, **common)
    return 1 if failed else 0
