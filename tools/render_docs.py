#!/usr/bin/env python3
"""Rewrite the measured tables of README.md and docs/*.md from the JSON the runs wrote.

    python tools/render_docs.py           # rewrite the blocks between the markers
    python tools/render_docs.py --check   # exit 1 (and say which block) if a doc disagrees

Sources: ``docs/bench_cpu.json`` (``tools/bench.py`` merges every figure it measures into it,
with the date, machine and command) and ``docs/toy.json`` (``python -m tools.toy --seeds 0-7
--compare-sum-sq 50 1000 10000 --out docs``).  A block
is the text between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``; the
rest of each document is prose, which must not quote these numbers itself.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: tools.* importable as in the tests
    sys.path.insert(0, str(REPO_ROOT))

from tools.pack_import import add_to_sys_path  # noqa: E402

add_to_sys_path()  # the pack as lipschitz_personalize

BENCH = REPO_ROOT / "docs" / "bench_cpu.json"
FULLSIZE = REPO_ROOT / "docs" / "bench_fullsize.json"
OPS = REPO_ROOT / "docs" / "bench_ops.json"
TOY = REPO_ROOT / "docs" / "toy.json"
LORA = REPO_ROOT / "docs" / "lora.json"
MICROWORLD_ACCURACY = REPO_ROOT / "docs" / "microworld_accuracy.json"  # tools/microworld/prompt_accuracy.py
MICROWORLD_SWEEP = REPO_ROOT / "docs" / "microworld_sweep.json"  # tools/microworld/sweep.py
PREVIEW = REPO_ROOT / "docs" / "bench_preview.jsonl"  # tools/bench_preview.py
PAPER_STEPS = 1000
GPU = REPO_ROOT / "docs" / "gpu"
# The GPU runs (tools/bench_gpu.py output, one JSON line per figure) and the modes each one
# measured as the code defines them today: the first run measured 12gb/8gb with bf16 compute,
# a recipe since replaced (its rows are shown as such).
GPU_RUNS = [("bench_gpu_modes_bf16.jsonl", {"faithful": "faithful", "lean": "lean",
                                            "12gb": "12gb with bf16 compute (superseded)",
                                            "8gb": "8gb with bf16 compute (superseded)"}),
            ("bench_gpu_modes_final.jsonl", {"12gb": "12gb", "8gb": "8gb"})]
DOCS = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs" / name for name in ("performance.md", "method.md", "toy.md", "lora.md", "microworld.md", "preview.md"))]
BLOCK = re.compile(r"(<!-- BEGIN generated:(?P<name>[a-z_-]+) -->\n)(?P<body>.*?)(<!-- END generated:(?P=name) -->)",
                   re.S)

# figure -> what it is (the ratio's numerator / denominator)
HEADLINE = {
    "reg_overhead": "step time, lambda=500 / the same step with lambda=0 (the regularizer's cost)",
    "paper_autograd_overhead": "the reference code's autograd `L_lip` loop / the lambda=0 step (comparison)",
    "reg_memory": "added peak RSS, lambda=500 / lambda=0, each in its own process",
    "ref_memory": "added peak RSS, ours (faithful default) / the reference layout (trainable + frozen fp32 copy)",
    "ref_memory_step_in_backward": "added peak RSS, ours with `step_in_backward` / the reference layout",
    "node_overhead": "seconds per training step in the node in a real server / in the bare trainer loop",
    "toy_seconds": "wall time of the full toy reproduction (one seed, all settings)",
}
OPTIONS = {
    "no_checkpointing": "gradient checkpointing off",
    "bf16": "`precision=bf16` (bf16 compute, fp32 deltas and Adam)",
    "adam_foreach": "`adam=foreach`",
    "adam_fused": "`adam=fused`",
    "step_in_backward": "`step_in_backward` (Adam per tensor inside backward)",
}


def record_figures(path: Path, figures: dict[str, dict[str, Any]], run: dict[str, Any]) -> None:
    """Merge a bench run's figures into ``path`` (each figure keeps the run that measured it)
    and re-render the docs' tables from the recorded JSON."""
    data = json.loads(path.read_text()) if path.exists() else {"figures": {}}
    data["figures"].update({name: {**line, **run} for name, line in figures.items()})
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    for doc in DOCS:
        doc.write_text(render(doc.read_text()))


def _fmt(value: float | None, unit: str | None = None) -> str:
    if value is None:
        return "not measured"
    return f"{value:.0f} s" if unit == "s" else f"{value:.3f}"


def _figures() -> dict[str, dict[str, Any]]:
    return json.loads(BENCH.read_text())["figures"] if BENCH.exists() else {}


def _runs(rows: list[dict[str, Any]]) -> str:
    """The distinct runs behind a table, as a footnote list."""
    seen: dict[str, str] = {}
    for r in rows:
        load = f", load {r['load_avg_1m']}" if "load_avg_1m" in r else ""
        seen.setdefault(r["command"], f"{r['date']}, {r['machine']}{load}")
    return "\n".join(f"* `{cmd}` ({when})" for cmd, when in seen.items())


def perf_summary() -> str:
    figures = _figures()
    rows, lines = [], ["| figure | what it is | target | measured | met |", "| --- | --- | --- | --- | --- |"]
    for name, what in HEADLINE.items():
        f = figures.get(name)
        if f is None:
            lines.append(f"| `{name}` | {what} | - | not measured | - |")
            continue
        rows.append(f)
        target = f"<= {f['target']:g}" if "target" in f else "-"
        met = "-" if "met" not in f else ("yes" if f["met"] else "**no**")
        lines.append(f"| `{name}` | {what} | {target} | {_fmt(f['value'], f.get('unit'))} | {met} |")
    return "\n".join(lines) + "\n\nMeasured by:\n\n" + _runs(rows) + "\n"


def perf_options() -> str:
    figures = _figures()
    rows, lines = [], ["| option | step time / faithful (lower is faster) | added peak memory / faithful |",
                       "| --- | --- | --- |"]
    for name, what in OPTIONS.items():
        speed, memory = figures.get(f"speed_{name}"), figures.get(f"memory_{name}")
        rows += [f for f in (speed, memory) if f is not None]
        skipped = next((f.get("skipped") or f.get("error") for f in (speed, memory, figures.get(name))
                        if f is not None and f.get("value") is None), None)
        cells = [_fmt(f["value"]) if f is not None and f.get("value") is not None else "-" for f in (speed, memory)]
        if skipped and cells == ["-", "-"]:
            cells = [f"not measured: {skipped}", "-"]
        lines.append(f"| {what} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n\nMeasured by:\n\n" + _runs(rows) + "\n"


# SD1.5's U-Net (v1-5-pruned-emaonly): parameters, and values in its largest tensor.
SD15_PARAMS, SD15_LARGEST = 859_520_964, 29_491_200


def _fullsize_figures() -> dict[str, dict[str, Any]]:
    return json.loads(FULLSIZE.read_text())["figures"] if FULLSIZE.exists() else {}


def perf_peaks() -> str:
    """The memory modes on the full-size U-Net (CPU): the budget term by term beside the measure."""
    from lipschitz_personalize.trainer.memory import MODES, ORDER, estimate

    figures = _fullsize_figures()
    lines = ["| mode | anchor | budget at 512 px (GB): anchor + delta + gradients + Adam + activations + other "
             "| estimate | measured 256 px | measured 384 px | **512 px** (extrapolated) | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for mode in ORDER:
        anchor = 4 if MODES[mode].anchor == "checkpoint" else 2
        e = estimate(mode, SD15_PARAMS, SD15_LARGEST, anchor, 512)
        terms = " + ".join(f"{e.parts[k] / 1e9:.2f}" for k in ("anchor", "delta", "gradients", "adam", "activations",
                                                               "other"))
        got = [figures.get(f"peak_gb_{mode}{suffix}") for suffix in ("_256", "_384", "")]
        rows += [g for g in got if g]
        cells = ["not measured" if g is None else f"{g['value']:.2f}" for g in got]
        final = got[2]
        met = "-" if final is None else ("yes" if final["met"] else "**no**")
        target = "-" if final is None else f"<= {final['target']:g}"
        lines.append(f"| `{mode}` | {'fp32 (checkpoint)' if anchor == 4 else 'fp16 (as ComfyUI stores it on GPUs)'} "
                     f"| {terms} | {e.total / 1e9:.2f} | {cells[0]} | {cells[1]} | {cells[2]} | {target} | {met} |")
    return "\n".join(lines) + "\n\nMeasured by:\n\n" + (_runs(rows) or "* nothing yet: run `make bench-fullsize`") + "\n"


def perf_fullsize() -> str:
    figures = {k: v for k, v in _fullsize_figures().items() if not k.startswith("peak_gb_")}
    lines = ["| figure | value | target | met | how |", "| --- | --- | --- | --- | --- |"]
    for name in sorted(figures):
        f = figures[name]
        met = "-" if "met" not in f else ("yes" if f["met"] else "**no**")
        target = f"<= {f['target']:g} {f['unit']}" if "target" in f else "-"
        how = f.get("method", "").replace("|", "\\|")  # a norm's bars would split the cell
        lines.append(f"| `{name}` | {f['value']:.3f} {f['unit']} | {target} | {met} | {how} |")
    if not figures:
        lines.append("| - | not measured | - | - | run `make bench-fullsize` |")
    return "\n".join(lines) + "\n\nMeasured by:\n\n" + _runs(list(figures.values())) + "\n"


def perf_ops() -> str:
    """Overhead ops per training step (tools/bench_ops.py): before and after, per mode and U-Net."""
    record = json.loads(OPS.read_text()) if OPS.exists() else {}
    lines = ["| U-Net | mode | overhead ops before | after | fewer by | target | after / faithful's after |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    runs = []
    for unet in ("sd15-full", "tiny"):
        rows = record.get(unet, {})
        before, after = rows.get("before", {}).get("overhead", {}), rows.get("after", {}).get("overhead", {})
        targets = rows.get("after", rows.get("before", {})).get("targets", {})
        within = rows.get("after", {}).get("within_faithful", 1.5)
        for mode in sorted(targets, key=("faithful", "lean", "12gb", "8gb").index):
            b, a, f = before.get(mode), after.get(mode), after.get("faithful")
            cut = f"{b / a:.1f}x" if b and a else "-"
            vs = f"{a / f:.2f} (target <= {within:g})" if a and f else "-"
            lines.append(f"| {unet} | `{mode}` | {b if b is not None else 'not measured'} "
                         f"| {a if a is not None else 'not measured'} | {cut} | >= {targets[mode]:g}x | {vs} |")
        runs += [r for r in (rows.get("before"), rows.get("after")) if r]
    how = "\n".join(f"* `{r['command']}` ({r['unet']}, {r['label']}, {r['date']}; bare forward + backward: "
                     f"{r['bare_ops']} ops{'; ' + r['note'] if r.get('note') else ''})" for r in runs)
    return "\n".join(lines) + "\n\nMeasured by:\n\n" + (how or "* nothing yet: run `python tools/bench_ops.py`") + "\n"


def _gpu_lines(name: str) -> list[dict[str, Any]]:
    path = GPU / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def _gpu_modes() -> list[tuple[str, str, str, dict[str, dict[str, Any] | None]]]:
    """``(file, mode, label, figures)`` per mode a GPU run measured; ``figures`` holds the mode's
    ``speed``, ``peak``, ``capped``, ``fits``, ``cosine`` and ``rel`` lines (None: not measured)."""
    keys = {"speed": "gpu_s_per_1000_{}", "peak": "gpu_peak_gb_{}", "capped": "gpu_peak_gb_{}_capped",
            "fits": "gpu_fits_{}", "cosine": "gpu_cosine_{}", "rel": "gpu_rel_diff_{}"}
    rows = []
    for file, modes in GPU_RUNS:
        lines = {f["name"]: f for f in _gpu_lines(file)}
        for mode, label in modes.items():
            figures = {k: lines.get(name.format(mode)) for k, name in keys.items()}
            if figures["speed"] is not None and figures["peak"] is not None:
                rows.append((file, mode, label, figures))
    return rows


def _capped(f: dict[str, dict[str, Any] | None]) -> str:
    return "not measured" if f["capped"] is None or f["capped"]["value"] is None else f"{f['capped']['value']} GB"


def perf_gpu() -> str:
    """The memory modes on a GPU, from the JSON lines of tools/bench_gpu.py in docs/gpu/."""
    lines = ["| mode | s / 1000 steps | state between steps | peak, allocator capped | peak, uncapped | "
             "smallest card it ran on | vs faithful: cosine, rel. diff (steps) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = _gpu_modes()
    for _, mode, label, f in rows:
        speed, peak, fits, cosine = f["speed"], f["peak"], f["fits"], f["cosine"]
        card = "not measured" if fits is None else f"{fits['value']} GB" if fits["value"] else "none of 8-24 GB"
        vs = ("reference" if mode == "faithful" else "not measured" if cosine is None else
              f"{cosine['value']:.5f}, {f['rel']['value']:.2g} ({cosine['steps']})")
        lines.append(f"| {label} | {speed['value']:.0f} s ({speed.get('px', 512)} px) | "
                     f"{peak.get('resident_between_steps_gb', 0):.2f} GB | {_capped(f)} | {peak['value']:.2f} GB | "
                     f"{card} | {vs} |")
    if not rows:
        return "Not measured: run `make bench-gpu` on a machine with CUDA.\n"
    first = rows[0][3]["speed"]
    sources = sorted({f"`docs/gpu/{file}`" for file, *_ in rows})
    return ("\n".join(lines) + f"\n\nMeasured on {first['device']}, torch {first['torch']}, {first['date']}, "
            f"`python tools/bench_gpu.py --caps` (and `--modes faithful 12gb 8gb --latents 64 --steps 8 --warmup 2` "
            f"for the current 12gb/8gb); lines in {', '.join(sources)}.\n")


def vram_modes() -> str:
    """README's per-mode table ("Which memory mode fits your card"): what each memory mode
    changes (trainer/memory.py) and what it held on a GPU (the current recipe's run in docs/gpu/)."""
    from lipschitz_personalize.trainer.memory import MODES

    current = {mode: f for _, mode, label, f in _gpu_modes() if label == mode}
    cpu = _fullsize_figures()
    lines = ["| mode | what it changes from the paper | held between steps (GPU) | peak under a capped allocator "
             "(smallest card it ran on) | peak at 512 px on the CPU stand-in (extrapolated) "
             "| delta vs faithful's (cosine) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, mode in MODES.items():
        f = current.get(name)
        peak = cpu.get(f"peak_gb_{name}")
        peak = "not measured" if peak is None else f"{peak['value']:.2f} GB"
        if f is None:
            lines.append(f"| `{name}` | {mode.changes} | not measured | not measured | {peak} | not measured |")
            continue
        capped = _capped(f) + (f" ({f['fits']['value']} GB)" if f["fits"] is not None and _capped(f) != "not measured"
                               else "")
        cosine = "reference" if name == "faithful" else (
            "not measured" if f["cosine"] is None else f"{f['cosine']['value']:.5f} after {f['cosine']['steps']} steps")
        lines.append(f"| `{name}` | {mode.changes} | {f['peak']['resident_between_steps_gb']:.2f} GB | {capped} "
                     f"| {peak} | {cosine} |")
    return "\n".join(lines) + "\n"


def _toy(render_name: str) -> Callable[[], str]:
    """A table of tools/toy/tables.py's, rendered from docs/toy.json."""
    def render() -> str:
        from tools.toy import tables

        if not TOY.exists():
            return "No toy run recorded: run `python -m tools.toy --seeds 0-7 --out docs`.\n"
        return getattr(tables, render_name)(json.loads(TOY.read_text())).rstrip("\n") + "\n"

    return render


def _lora(section: str) -> dict[str, Any] | None:
    return json.loads(LORA.read_text()).get(section) if LORA.exists() else None


def _lora_run(r: dict[str, Any]) -> str:
    run = r["run"]
    return f"`{run['command']}` ({run['date']}, {run['machine']}, {run['cpus']} threads)"


def lora_table() -> str:
    """Size and error of the exported LoRA by rank, on a trained delta (docs/lora.json, ``tools/bench_lora.py``)."""
    t = _lora("trained")
    if t is None:
        return "| rank | file | error |\n| --- | --- | --- |\n| not measured | - | - |\n| run `python tools/bench_lora.py` | - | - |\n"
    lines = ["| rank | file | relative error `\\|delta - LoRA\\| / \\|delta\\|` |", "| --- | --- | --- |",
             f"| (the delta file, fp16) | {t['delta_mb_fp16']:.1f} MB | 0 |"]
    lines += [f"| {r['rank']} | {r['file_mb']:.2f} MB | {r['rel_error']:.3f} |" for r in t["ranks"]]
    dropped = t["ranks"][0]["dropped_norm_fraction"]
    return ("\n".join(lines) + f"\n\n{t['model']}, {t['steps']} steps at lr {t['lr']:g}, lambda {t['lambda']:g}. "
            f"Rank keeping 95% of the delta's norm: **{t['rank_for_95pct_norm']}**. Biases and norms (dropped) hold "
            f"{dropped:.1%} of the norm. Measured by {_lora_run(t)}.\n")


def lora_microworld() -> str:
    """The exported LoRAs of the micro-world subject's delta by rank: size, error, and what they
    draw next to the full delta (docs/lora.json ``microworld``, ``tools/bench_lora.py``)."""
    t = _lora("microworld")
    if t is None:
        return ("| model | file | error |\n| --- | --- | --- |\n| not measured | - | - |\n"
                "| run `python tools/bench_lora.py --only microworld` | - | - |\n")
    s = t["summary"]

    def fmt(name: str, m: str) -> str:
        return f"{s[name][m]['median']:.3f} ({s[name][m]['worst']:.3f})" if m in s[name] else "-"

    def gain(name: str) -> float:
        """The share of the full delta's subject-fidelity gain over the base that ``name`` keeps."""
        base = s["base"]["clip_i"]["median"]
        return (s[name]["clip_i"]["median"] - base) / (s[t["trained"]]["clip_i"]["median"] - base)

    lines = ["| model | file | relative error `\\|delta - LoRA\\| / \\|delta\\|` | subject fidelity (CLIP-I): median (worst) "
             "| share of the delta's CLIP-I gain | drift: median (worst) | concepts drawn as asked: median (worst) |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| base model | - | - | {fmt('base', 'clip_i')} | 0% | - | {fmt('base', 'accuracy')} |",
             f"| {t['trained']}: the full delta (fp16) | {t['delta_mb_fp16']:.1f} MB | 0 | {fmt(t['trained'], 'clip_i')} "
             f"| 100% | {fmt(t['trained'], 'drift')} | {fmt(t['trained'], 'accuracy')} |"]
    for r in t["ranks"]:
        name = f"LoRA rank {r['rank']}"
        lines.append(f"| {name} | {r['file_mb']:.2f} MB | {r['rel_error']:.3f} "
                     f"| {fmt(name, 'clip_i')} | {gain(name):.0%} | {fmt(name, 'drift')} | {fmt(name, 'accuracy')} |")
    keeping = t["rank_for_95pct_norm"]
    return ("\n".join(lines) + f"\n\n{t['model']}, the subject trained {t['steps']} steps at lr {t['lr']:g}, "
            f"lambda {t['lambda']:g}; seeds {', '.join(map(str, t['seeds']))} (each trains and samples with its seed), "
            f"{t['batch']} pictures per prompt and seed; medians over the seeds (the worst seed in brackets; size "
            f"and error: medians). Rank keeping 95% of the delta's norm: **{statistics.median(keeping):g}** (per seed: "
            f"{', '.join(map(str, keeping))}). Biases and norms (dropped) hold "
            f"{t['ranks'][0]['dropped_norm_fraction']:.1%} of the norm. Measured by {_lora_run(t)}.\n")


def lora_fullsize() -> str:
    """The full-size SVD's time on the CPU (docs/lora.json)."""
    f = _lora("fullsize")
    if f is None:
        return "| figure | value |\n| --- | --- |\n| not measured | - |\n| run `python tools/bench_lora.py --only fullsize` | - |\n"
    rows = [("U-Net tensors / weights factored", f"{f['tensors']} / {f['factored']}"), ("rank", f["rank"]),
            ("wall time on the CPU", f"{f['seconds']:.0f} s"), ("LoRA size (fp16)", f"{f['lora_mb']:.1f} MB"),
            ("peak RSS growth during the export", f"{f['peak_rss_growth_mb']:.0f} MB")]
    return ("| figure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
            + f"\n\nMeasured by {_lora_run(f)}.\n")


def microworld_accuracy() -> str:
    """The micro-world base model's prompt accuracy, per concept, with the sampler settings."""
    r = json.loads(MICROWORLD_ACCURACY.read_text())
    s = r["sampler"]
    lines = [f"Measured {r['date']} with `{r['command']}` (U-Net: {r['unet']}): "
             f"{s['sampler_name']}/{s['scheduler']}, {s['steps']} steps, cfg {s['cfg']:g}, seeds "
             f"{', '.join(map(str, r['seeds']))}, empty negative prompt, 64x64. The classifier names "
             f"{r['classifier_accuracy_on_true_renders']:.0%} of fresh true renders correctly.",
             "", "| concept | named correctly |", "|---|---|"]
    lines += [f"| {name} | {v:.0%} |" for name, v in r["per_concept"].items()]
    lines.append(f"| **all ({r['samples']} samples)** | **{r['prompt_accuracy']:.0%}** |")
    return "\n".join(lines) + "\n"


def microworld_sweep() -> str:
    """The lambda sweep in the micro-world (median and worst seed per model)."""
    r = json.loads(MICROWORLD_SWEEP.read_text())
    sch = r["schedule"]
    cols = (("clip_i", "subject fidelity (CLIP-I)"), ("clip_t", "prompt fidelity (CLIP-T)"),
            ("accuracy", "concepts drawn as asked"), ("drift", "drift (1 - paired cosine)"))
    lines = ["| model | " + " | ".join(f"{title}: median (worst)" for _, title in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for name, summary in r["summary"].items():
        cells = [f"{summary[m]['median']:.3f} ({summary[m]['worst']:.3f})" if m in summary else "-" for m, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\nMeasured {r['date']} with `{r['command']}` ({r['machine']}, {r['seconds']} s): "
            f"seeds {', '.join(map(str, r['seeds']))} (each trains and samples with its seed), {sch['steps']} steps at "
            f"lr {sch['learning_rate']:g}, {sch['resolution']} px, {sch['batch']} pictures per prompt and seed, "
            f"{sch['sampler']['sampler_name']} {sch['sampler']['steps']} steps cfg {sch['sampler']['cfg']:g}; "
            f"concept prompts: {', '.join(repr(p) for p in sch['concept_prompts'])}; worst = lowest fidelity or "
            f"accuracy, highest drift.\n")


def preview_cost() -> str:
    """A preview's parts and a training step timed in one run on the CPU with the full-size
    models (docs/bench_preview.jsonl, ``tools/bench_preview.py``; the last line of each part)."""
    parts = {r["part"]: r for r in map(json.loads, PREVIEW.read_text().splitlines())}
    from lipschitz_personalize.trainer.preview import DEFAULT_EVERY

    u, v, s, p = parts["unet"], parts["vae"], parts["step"], parts["preview"]
    previews = PAPER_STEPS // DEFAULT_EVERY + 1
    rows = [("U-Net forward, CFG batch of 2, delta applied, no gradient (one sampler step)", u),
            ("VAE decode, one image", v),
            (f"one preview: {p['prompts']} prompts x ({p['sampler_steps']} sampler steps + 1 decode), summed from the parts", p),
            (f"one training step, `{p['mode']}`, {s['size']} px, batch 1, gradient checkpointing", s)]
    return (f"| Part, at {p['size']} px (full size) | Time on the CPU | Peak RAM above the models |\n| --- | --- | --- |\n"
            + "".join(f"| {what} | {r['seconds']:.{1 if r['seconds'] < 100 else 0}f} s | "
                      + (f"{r['peak_gb_above']:.2f} GB" if r is not s else "- (not a preview)") + " |\n"
                      for what, r in rows)
            + f"\nOne preview costs **{p['training_steps']:.1f} training steps** at {p['train_size']} px; at the "
            f"paper's {PAPER_STEPS} steps the default `preview_every={DEFAULT_EVERY}` takes {previews} previews "
            f"(the base's included): **{previews * p['training_steps'] / PAPER_STEPS:.1%} of the training time**. "
            f"Measured by `{p['command']}` ({p['date']}, {p['device']}).\n")


RENDERERS: dict[str, Callable[[], str]] = {
    "preview-cost": preview_cost,
    "lora-table": lora_table, "lora-microworld": lora_microworld, "lora-fullsize": lora_fullsize,
    "perf-summary": perf_summary, "perf-options": perf_options, "perf-fullsize": perf_fullsize, "perf-ops": perf_ops, "perf-peaks": perf_peaks, "perf-gpu": perf_gpu,
    "vram-modes": vram_modes,
    "toy-table": _toy("markdown_table"),
    "toy-per-seed": _toy("markdown_per_seed_table"), "toy-comparison": _toy("markdown_comparison_table"),
    "microworld-accuracy": microworld_accuracy, "microworld-sweep": microworld_sweep}


def render(text: str) -> str:
    def block(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise KeyError(f"unknown generated block {name!r}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 where a doc disagrees")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = render(text)
        if new != text:
            stale.append(doc.relative_to(REPO_ROOT).as_posix())
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"out of date with docs/bench_cpu.json / docs/toy.json: {', '.join(stale)} "
              "(run python tools/render_docs.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
