#!/usr/bin/env python3
"""The host cost of a training step, counted: overhead ops per step of the full-size SD1.5 U-Net.

    flock /work/wt/fullsize.lock python tools/bench_ops.py --label after   # ~15 GB RAM at the peak
    python tools/bench_ops.py --tiny                                       # the small U-Net (a quick check)

For each memory mode (``faithful``, ``lean``, ``12gb``, ``8gb``) one training step at 64 px
(8x8 latents, batch 1, gradient checkpointing) runs under ``torch.profiler`` on the CPU after one
warm-up step; a figure is the number of top-level ``aten::`` ops (an op not called from inside
another: what the host issues, one kernel launch or more each on a GPU) of that step minus those
of a bare forward + backward of the same U-Net with the same checkpointing and no delta (its
parameters trainable). So the figure counts what the method adds per step: the ``theta0 + delta``
sums, the optimizer, the regularizer, metrics and finiteness checks - the work whose count, not
size, sets a step's floor on a GPU (docs/performance.md).

Each mode runs in its own process. So that the full-size run fits beside other work on a 24 GB
machine, the mode runs' anchor is one zero per tensor broadcast to the tensor's shape (no
memory; ``theta0 + delta`` is still one full-size add per tensor) and torch Adam's moments live
in memory-mapped files (the page cache, written back under pressure): neither changes an op.
The delta's flat buffer and the compact modes' moments are real (3.4 GB each at most). The bare run has real fp32 weights (~7 GB with their gradients). The counts of a
``--label`` are merged into ``docs/bench_ops.json`` with the date and command;
``tools/render_docs.py`` renders them into docs/performance.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import REPO_ROOT, checkpoint_units, comfy_ready, make_unet, mode_trainer  # noqa: E402

RECORD = REPO_ROOT / "docs" / "bench_ops.json"
MODES = ("faithful", "lean", "12gb", "8gb")
LATENT = 8
TARGETS = {"faithful": 3.0, "lean": 3.0, "12gb": 10.0, "8gb": 10.0}
"""The reduction each mode must reach against the ``before`` counts (issue 22), and every mode
within :data:`WITHIN_FAITHFUL` of ``faithful``."""
WITHIN_FAITHFUL = 1.5


def top_level_ops(fn) -> int:
    """The ``aten::`` ops ``fn`` issues that no other ``aten::`` op called."""
    import torch.profiler

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def bare_step(tiny: bool):
    """Forward + backward of the U-Net with its own parameters trainable, same checkpointing."""
    import torch
    import torch.utils.checkpoint

    from bench_models import eps_fn, make_data, sd_abar
    from lipschitz_personalize.trainer.loop import q_sample

    unet = make_unet(tiny).requires_grad_(True)
    for m in checkpoint_units(unet):
        m.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))(
            m.forward)
    data, abar, g, model = make_data(LATENT, "cpu"), sd_abar(), torch.Generator().manual_seed(0), eps_fn(unet)

    def step() -> None:
        x0, cond = data.sample(g)
        t = torch.randint(abar.numel(), (1,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = torch.nn.functional.mse_loss(model(q_sample(x0, abar[t], eps), t, cond), eps)
        loss.backward()
        unet.zero_grad(set_to_none=True)
    return step


def _broadcast_anchor(unet) -> None:
    """Replace every parameter by a zero broadcast to its shape (no memory)."""
    import torch

    for module in unet.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)


def _mapped_zeros(like, folder: str):
    """Zeros shaped like ``like`` in a memory-mapped file (unlinked at once: the mapping keeps it)."""
    import torch

    path = os.path.join(folder, f"{uuid.uuid4().hex}.bin")
    with open(path, "wb") as f:
        f.truncate(like.numel() * like.element_size())
    t = torch.from_file(path, shared=True, size=like.numel(), dtype=like.dtype).view(like.shape)
    os.unlink(path)
    return t


def mode_step(mode: str, tiny: bool, folder: str):
    import torch

    from lipschitz_personalize.trainer import compact_adam

    compact_adam.CPU_CHUNK = compact_adam.CHUNK  # count the slices a GPU runs, not the CPU's smaller ones

    unet = make_unet(tiny, dtype=torch.float16, init=False)
    _broadcast_anchor(unet)
    trainer = mode_trainer(unet, mode, LATENT)
    optimizer = trainer.update.optimizer
    if isinstance(optimizer, torch.optim.Adam):  # faithful, lean: torch's fp32 moments, created here
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": _mapped_zeros(p, folder),
                                  "exp_avg_sq": _mapped_zeros(p, folder)}
    run = trainer.running()
    run.__enter__()  # as trainer.job runs it: the delta's hooks registered once per run

    def step() -> None:
        # Holds ``run``: were the context collected, its exit would unregister the hooks and
        # every step would register them again (168 detach ops per step on the tiny U-Net
        # were counted that way in the first "after" record).
        assert run is not None
        trainer.step()
    return step


def child(mode: str, tiny: bool) -> dict:
    import torch

    comfy_ready(cpu=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_ops_") as folder:
        step = bare_step(tiny) if mode == "bare" else mode_step(mode, tiny, folder)
        step()  # warm-up: the first step creates what is created once (Adam's state, caches)
        return {"mode": mode, "ops": top_level_ops(step)}


def run_modes(tiny: bool, modes: tuple[str, ...] = MODES) -> dict[str, int]:
    counts = {}
    for mode in ("bare", *modes):
        cmd = [sys.executable, __file__, "--child", mode] + (["--tiny"] if tiny else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        counts[mode] = json.loads(out.strip().splitlines()[-1])["ops"]
        print(f"{mode}: {counts[mode]} ops", file=sys.stderr, flush=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=("bare", *MODES), help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="the small U-Net (25.8M parameters), not SD1.5's")
    ap.add_argument("--label", default="after", help="which record this run is (before/after a change)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="a subset (merged into the record)")
    ap.add_argument("--no-record", action="store_true", help="print only, do not merge into docs/bench_ops.json")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tiny)))
        return 0
    counts = run_modes(args.tiny, tuple(args.modes))
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    unet = "tiny" if args.tiny else "sd15-full"
    old = record.get(unet, {}).get(args.label, {}).get("overhead", {})
    row = {"label": args.label, "unet": unet, "latent": LATENT,
           "bare_ops": counts["bare"], "overhead": {**old, **{m: counts[m] - counts["bare"] for m in args.modes}},
           "targets": TARGETS, "within_faithful": WITHIN_FAITHFUL, "date": datetime.date.today().isoformat(),
           "command": "python " + " ".join(shlex.quote(a) for a in ["tools/bench_ops.py", *(argv or sys.argv[1:])])}
    print(json.dumps(row))
    if not args.no_record:
        record.setdefault(unet, {})[args.label] = row
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
