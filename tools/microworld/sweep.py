#!/usr/bin/env python3
"""The paper's trade-off in the micro-world: fine-tune the subject with lambda in
{0, 1, 10, 100, 500, 2000, 10000} and with DreamBooth (lambda 0 + prior preservation), over
several seeds, through a real ComfyUI server and the shipped nodes, and measure each model as
``protocol.py`` does (subject fidelity, prompt fidelity, concept accuracy, drift).

    .venv/bin/python tools/microworld/sweep.py --json docs/microworld_sweep.json --plot docs/microworld_sweep.png

Seed ``k`` (0, 1, 2 by default: no seed is picked) trains every model with seed ``k`` and samples
with seed ``k``. The JSON holds every number per seed; ``tools/render_docs.py`` renders the
table of docs/microworld.md from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.comfy_server import ComfyServer
from tools.microworld import protocol

LAMBDAS = (0.0, 1.0, 10.0, 100.0, 500.0, 2000.0, 10000.0)
METRICS = ("clip_i", "clip_t", "accuracy", "drift")


def models_for(seed: int, lambdas: tuple[float, ...], dreambooth: bool) -> dict[str, dict | None]:
    models: dict[str, dict | None] = {"base": None}
    models.update({f"lambda {lam:g}": protocol.personalize(lam, seed) for lam in lambdas})
    if dreambooth:
        models["DreamBooth"] = protocol.dreambooth(seed)
    return models


def record(per_seed: dict[str, list[dict]], seed: int, scores: dict[str, list[protocol.Scores]]) -> None:
    """Append one seed's ``protocol.scores`` to ``per_seed`` as the JSON rows ``summarize`` reads."""
    for name, (s,) in scores.items():
        per_seed.setdefault(name, []).append(
            {"seed": seed, "clip_i": s.clip_i, "clip_t": s.clip_t, "accuracy": s.accuracy, "drift": s.drift,
             "drift_per_prompt": s.drift_per_prompt})


def summarize(per_seed: dict[str, list[dict]]) -> dict[str, dict]:
    """Median and worst over the seeds (worst: lowest fidelity or accuracy, highest drift)."""
    out = {}
    for name, rows in per_seed.items():
        out[name] = {}
        for m in METRICS:
            values = [r[m] for r in rows if r[m] is not None]
            if values:
                out[name][m] = {"median": statistics.median(values),
                                "worst": max(values) if m == "drift" else min(values)}
    return out


def plot(result: dict, path: Path) -> None:
    """Median subject fidelity, concept accuracy and drift against log10(lambda) (lambda 0 at -1);
    DreamBooth and the base model as flat reference lines."""
    from lipschitz_personalize.trainer.render.plot import report
    lams = result["lambdas"]
    xs = [math.log10(lam) if lam > 0 else -1.0 for lam in lams]
    s = result["summary"]
    panels = []
    for m, title in (("clip_i", "subject fidelity: CLIP-I to the photos (higher: more like the subject)"),
                     ("accuracy", "prompt fidelity: other concepts named correctly by the classifier"),
                     ("drift", "drift: 1 - paired cosine to the base model's pictures (0: no drift)")):
        series = [("lambda sweep, median", xs, [s[f"lambda {lam:g}"][m]["median"] for lam in lams]),
                  ("worst seed", xs, [s[f"lambda {lam:g}"][m]["worst"] for lam in lams])]
        for ref in ("DreamBooth", "base"):
            if m in s.get(ref, {}):
                series.append((ref, [xs[0], xs[-1]], [s[ref][m]["median"]] * 2))
        panels.append((f"{title}; x: log10(lambda), lambda 0 at -1", series))
    report(panels).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (training and sampling)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=LAMBDAS)
    ap.add_argument("--no-dreambooth", action="store_true")
    ap.add_argument("--batch", type=int, default=4, help="pictures per prompt and seed")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--server-dir", type=Path, help="default: a temporary folder")
    args = ap.parse_args(argv)
    from tools.pack_import import add_to_sys_path
    add_to_sys_path()
    t0 = time.time()
    lambdas = tuple(args.lambdas)
    per_seed: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(args.server_dir or Path(tmp)) as server:
        protocol.install(server)
        for seed in range(args.seeds):
            models = models_for(seed, lambdas, not args.no_dreambooth)
            g = protocol.graph(models, (seed,), batch=args.batch, save=True)
            result = server.client.run(g, timeout=3600)
            if result.status != "success":
                raise SystemExit(f"seed {seed}: {(result.error or {}).get('exception_message', result.error)}")
            record(per_seed, seed, protocol.scores(result, models, (seed,), batch=args.batch,
                                                   output_dir=server.output_dir))
            print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    result = {"command": "python tools/microworld/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
              "seconds": round(time.time() - t0),
              "schedule": {"steps": protocol.STEPS, "learning_rate": protocol.LR, "resolution": protocol.RES,
                           "sampler": protocol.SAMPLER, "batch": args.batch,
                           "concept_prompts": list(protocol.CONCEPT_PROMPTS),
                           "subject_prompt": protocol.SUBJECT_PROMPT, "class_prompt": protocol.CLASS_PROMPT,
                           "dreambooth_class_images": protocol.DREAMBOOTH_CLASS_IMAGES},
              "lambdas": list(lambdas), "seeds": list(range(args.seeds)),
              "per_seed": per_seed, "summary": summarize(per_seed)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
