#!/usr/bin/env python3
"""Full-size SD1.5 figures on this machine: what a real run writes to disk.

    python tools/bench_fullsize.py          # what `make bench-fullsize` runs

ComfyUI's SD1.5 ``UNetModel`` at full size (859.5M parameters, random seeded weights, no
download) trains 2 steps at 64 px on the CPU with Adam stepped in backward (the same delta and
moments as the default update, one parameter-sized buffer less), then the pack's own writer
(``nodes/host/delta_file.py``) saves the finished run and the stopped run in the default
``delta_dtype`` into a temporary folder.  One JSON line per figure: ``disk_gb_finished`` and
``disk_gb_stopped`` (targets 1.8 and 3.6 GB), and the same for ``delta_dtype=fp32``.  The
figures are also recorded in ``docs/bench_fullsize.json`` (with date and command), from which
``tools/render_docs.py`` writes the table in docs/performance.md.  Needs about 14 GB of free RAM.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import REPO_ROOT, comfy_ready, make_trainer, make_unet  # noqa: E402

TARGETS = {"disk_gb_finished": 1.8, "disk_gb_stopped": 3.6}
RECORD = REPO_ROOT / "docs" / "bench_fullsize.json"
EMITTED: dict[str, dict] = {}


def emit(name: str, value: float, unit: str, **extra) -> None:
    line = {"name": name, "value": round(value, 3), "unit": unit, **extra}
    if name in TARGETS:
        line.update(target=TARGETS[name], met=value <= TARGETS[name])
    print(json.dumps(line), flush=True)
    EMITTED[name] = line


def record() -> None:
    """Merge the figures into docs/bench_fullsize.json and re-render the docs' tables."""
    from render_docs import record_figures

    record_figures(RECORD, EMITTED, {"date": time.strftime("%Y-%m-%d"), "machine": "CPU",
                                     "command": "python tools/bench_fullsize.py"})


def main() -> int:
    comfy_ready(cpu=True)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from test_persistence import _pack_module  # the pack imported as ComfyUI imports it

    delta_file = _pack_module("nodes.host.delta_file")
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
    record()
    return 0


if __name__ == "__main__":
    sys.exit(main())
