"""Issue 13 item 2, measured before it is built: the delta through ComfyUI's weight wrappers.

The node adds ``theta0 + delta`` with forward hooks (:meth:`trainer.delta.ParameterDelta.applied`).
Core's training node instead puts a function in each layer's ``weight_function`` /
``bias_function``, which ``comfy.ops.cast_bias_weight`` applies after casting (and copying) the
weight: the mechanism that also works for partial (``--lowvram``) loads.  This probe trains the
bench's tiny U-Net both ways from the same seed, in one process, and prints the largest
difference of the deltas and the seconds per step of each (interleaved rounds)::

    .venv/bin/python tools/probe_weight_wrapper.py [--steps 3] [--rounds 3]

The wrappers are set on the module for the run only, like the hooks; nothing of this is used
by the node yet (docs/performance.md, "Injection").
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Iterator, Sequence

from bench_models import checkpoint_units, comfy_ready, eps_fn, make_data, make_unet, sd_abar
from torch import nn


def wrapper_delta_class():
    from lipschitz_personalize.trainer.delta import ParameterDelta, _checkpointed

    class WrapperDelta(ParameterDelta):
        """``theta0 + delta`` through ComfyUI's per-layer weight/bias functions."""

        @contextlib.contextmanager
        def applied(self, checkpoint: Sequence[nn.Module] = ()) -> Iterator[None]:
            modules = dict(self.module.named_modules())
            for name, d in self.delta.items():
                owner, _, attr = name.rpartition(".")
                m = modules[owner]
                m.__dict__.setdefault(f"{attr}_function", []).append(lambda w, d=d: w + d)
                m.comfy_cast_weights = True
            for m in checkpoint:
                m.forward = _checkpointed(m.forward)
            try:
                yield
            finally:
                for m in {modules[n.rpartition(".")[0]] for n in self.delta}:
                    for key in ("weight_function", "bias_function", "comfy_cast_weights"):
                        m.__dict__.pop(key, None)
                for m in checkpoint:
                    m.__dict__.pop("forward", None)

    return WrapperDelta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="steps before the deltas are compared")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of 5 steps each way")
    args = p.parse_args()
    comfy_ready(cpu=True)
    from lipschitz_personalize.trainer.config import TrainConfig
    from lipschitz_personalize.trainer.delta import ParameterDelta
    from lipschitz_personalize.trainer.loop import RegularizedTrainer

    unet = make_unet(tiny=True)
    trainers = {kind: RegularizedTrainer(eps_fn(unet), cls(unet), sd_abar(), make_data(args.latent, "cpu"),
                                         TrainConfig(steps=10**6, lr=2e-6, lam=500.0),
                                         checkpoint=checkpoint_units(unet))
                for kind, cls in (("hooks", ParameterDelta), ("wrappers", wrapper_delta_class()))}
    for t in trainers.values():
        for _ in range(args.steps):
            t.step()
    a, b = (t.delta.delta for t in trainers.values())
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    reached = sum(bool(b[k].abs().sum() > 0) for k in b)
    print(f"after {args.steps} steps: max |delta_hooks - delta_wrappers| = {diff:.3g}; "
          f"{reached}/{len(b)} tensors trained through the wrappers")
    seconds: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for kind, t in trainers.items():
            t0 = time.perf_counter()
            for _ in range(5):
                t.step()
            seconds[kind].append((time.perf_counter() - t0) / 5)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"s/step: hooks {med['hooks']:.3f}, wrappers {med['wrappers']:.3f} "
          f"(wrappers / hooks {med['wrappers'] / med['hooks']:.3f})")


if __name__ == "__main__":
    main()
