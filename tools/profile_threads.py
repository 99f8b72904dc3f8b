"""Why a training step is slower in a second thread on a CPU (docs/performance.md, node_overhead).

Runs the bench's bare trainer (ComfyUI's tiny SD15 U-Net, ``--latent 16``) alternately in the
main thread and in a new thread, under torch.profiler, and prints the seconds per step and the
ops whose self-CPU time differs most, as a markdown table.  Run it on a quiet machine, once as
is and once with ``OMP_WAIT_POLICY=PASSIVE`` or ``ACTIVE`` in the environment to see the
OpenMP wait policy move the gap::

    .venv/bin/python tools/profile_threads.py [--steps 6] [--rounds 2] [--rows 12]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

from bench_models import comfy_ready, make_trainer, make_unet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args()
    comfy_ready(cpu=True)
    from torch.profiler import ProfilerActivity, profile

    trainer = make_trainer(make_unet(tiny=True), args.latent, steps=10**6, lr=2e-6)
    for _ in range(3):
        trainer.step()
    seconds: dict[str, list[float]] = {"main": [], "thread": []}
    ops: dict[str, dict[str, float]] = {}

    def run(where: str) -> None:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.step()
            seconds[where].append((time.perf_counter() - t0) / args.steps)
        ops[where] = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}

    for _ in range(args.rounds):
        run("main")
        worker = threading.Thread(target=run, args=("thread",))
        worker.start()
        worker.join()
    main_s, thread_s = statistics.median(seconds["main"]), statistics.median(seconds["thread"])
    print(f"s/step: main {main_s:.3f}, second thread {thread_s:.3f} (ratio {thread_s / main_s:.3f}); "
          f"profile of the last round, ms/step of self CPU")
    m, t = ops["main"], ops["thread"]
    print("| op | main thread | second thread |\n| --- | --- | --- |")
    for key in sorted(set(m) | set(t), key=lambda k: -abs(t.get(k, 0) - m.get(k, 0)))[:args.rows]:
        print(f"| `{key}` | {m.get(key, 0):.1f} | {t.get(key, 0):.1f} |")
    print(f"| total | {sum(m.values()):.1f} | {sum(t.values()):.1f} |")


if __name__ == "__main__":
    main()
