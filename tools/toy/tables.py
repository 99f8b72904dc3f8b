"""The toy's results as text: the markdown tables of ``docs/toy.md`` (pure functions of
``toy.json``, no timings) and the console summary."""
from __future__ import annotations

from typing import Any, Sequence


def _seed_text(seeds: Sequence[int]) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(v) for v in seeds)


def _mw(entry: dict[str, Any], key: str, signed: bool = False) -> str:
    """``median (worst)`` over the seeds; the value alone for one seed."""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if len(entry[key]["per_seed"]) == 1:
        return fmt.format(entry[key]["median"])
    return f"{fmt.format(entry[key]['median'])} ({fmt.format(entry[key]['worst'])})"


def _row_label(name: str, entry: dict[str, Any]) -> str:
    if name == "pretrained":
        return "pretrained (untrained baseline, before fine-tuning)"
    if entry["prior_weight"]:
        kept = _mw(entry, "preservation_class0")
        return f"DreamBooth-style (class 0 replayed x{entry['prior_weight']:g}; class 0 kept: {kept})"
    if entry.get("regularizer") not in (None, "mean_sq"):
        return f"{entry['regularizer']} lambda = {entry['lam']:.4g} (matched to mean_sq {entry['nominal_lam']:g})"
    return f"lambda = {entry['lam']:g}"


def markdown_table(report: dict[str, Any]) -> str:
    """The median (worst) over seeds per setting, as a GitHub markdown table.

    Rows: the pre-trained model (the untrained baseline: its adaptation is what doing nothing
    gives), each ``mean_sq`` lambda, the DreamBooth-style baseline.  A pure function of the
    ``toy.json`` content (no timings), so pasting it is reproducible.
    """
    summary = report["summary"]
    seeds = report["config"]["seeds"]
    n = len(seeds)
    stat = f"median (worst) over {n} seeds ({_seed_text(seeds)})" if n > 1 else f"seed {seeds[0]}"
    lines = [
        f"| setting - {stat} | mean preservation | worst-class preservation | adaptation "
        "| adaptation gain over pretrained | ‖delta‖ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = ["pretrained"] + [n_ for n_, e in summary.items()
                              if n_ != "pretrained" and e.get("regularizer", "mean_sq") in (None, "mean_sq")]
    names.sort(key=lambda n_: (n_ != "pretrained", summary[n_]["prior_weight"] > 0))  # stable: lambdas in order
    for name in names:
        e = summary[name]
        gain = "0 (baseline)" if name == "pretrained" else _mw(e, "adaptation_gain", signed=True)
        adapt = _mw(e, "adaptation")
        if name == "pretrained":
            adapt = f"**{adapt}**"
        lines.append(f"| {_row_label(name, e)} | {_mw(e, 'preservation_mean')} | {_mw(e, 'preservation_min')} "
                     f"| {adapt} | {gain} | {_norm(e)} |")
    return "\n".join(lines) + "\n"


def _norm(e: dict[str, Any]) -> str:
    """``||delta||``: median (max) over seeds (larger is further from the pre-trained model)."""
    d = e["delta_norm"]
    if d["max"] == 0:
        return "0"
    return f"{d['median']:.3g}" if len(d["per_seed"]) == 1 else f"{d['median']:.3g} (max {d['max']:.3g})"


def markdown_comparison_table(report: dict[str, Any]) -> str:
    """``mean_sq`` against ``sum_sq`` at matched strength, median (worst) over seeds ("" if not run)."""
    comparison = report["config"].get("sum_sq_comparison")
    if not comparison:
        return ""
    summary = report["summary"]
    lines = [
        f"| mean_sq lambda | L_lip | lambda - median (worst) over seeds {_seed_text(report['config']['seeds'])} "
        "| mean preservation | worst-class preservation | adaptation | ‖delta‖ |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lam in comparison["mean_sq_lambdas"]:
        for name in (f"lambda_{lam:g}", f"sum_sq_lambda_{lam:g}"):
            if name not in summary:
                continue
            e = summary[name]
            kind = e.get("regularizer") or "mean_sq"
            lam_text = f"{e['lam']:g}" if kind == "mean_sq" else f"{e['lam']:.4g}"
            lines.append(f"| {lam:g} | {kind} | {lam_text} | {_mw(e, 'preservation_mean')} "
                         f"| {_mw(e, 'preservation_min')} | {_mw(e, 'adaptation')} | {_norm(e)} |")
    return "\n".join(lines) + "\n"


def markdown_per_seed_table(report: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """Per seed and setting: mean preservation / worst-class preservation / adaptation."""
    seeds = [str(v) for v in report["config"]["seeds"]]
    summary = report["summary"]
    names = list(names) if names is not None else list(summary)
    lines = ["| setting | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
             "| --- |" + " --- |" * len(seeds)]
    for name in names:
        cells = []
        for sd in seeds:
            m = report["per_seed"][sd]["settings"][name]
            cells.append(f"{m['preservation_mean']:.2f} / {m['preservation_min']:.2f} / {m['adaptation']:.2f}")
        lines.append(f"| {_row_label(name, summary[name]).split(' (')[0] if name != 'pretrained' else 'pretrained'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_table(report: dict[str, Any]) -> str:
    seeds = report["config"]["seeds"]
    lines = []
    for sd in seeds:
        lines.append(f"seed {sd}")
        lines.append(f"  {'setting':<40} {'mean pres':>9} {'worst':>6} {'adapt':>6} {'||delta||':>9} {'s':>6}")
        for name, m in report["per_seed"][str(sd)]["settings"].items():
            lines.append(
                f"  {m['label']:<40} {m['preservation_mean']:9.3f} {m['preservation_min']:6.3f} "
                f"{m['adaptation']:6.3f} {m['delta_norm']:9.3f} {m['seconds']:6.1f}"
            )
    if len(seeds) > 1:
        lines.append(f"median (worst) over seeds {_seed_text(seeds)}")
        lines.append(f"  {'setting':<40} {'mean pres':>15} {'worst class':>15} {'adapt':>15}")
        for name, e in report["summary"].items():
            lines.append(f"  {e['label']:<40} {_mw(e, 'preservation_mean'):>15} {_mw(e, 'preservation_min'):>15} "
                         f"{_mw(e, 'adaptation'):>15}")
    lines.append(f"total {report['total_seconds']:.1f} s")
    return "\n".join(lines)
