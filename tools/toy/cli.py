"""``python -m tools.toy --seeds 0-7 --out DIR``: run the toy experiment and write
``DIR/toy.json`` and ``DIR/toy.png`` (``docs/toy.md`` has the commands behind its tables)."""
from __future__ import annotations

import argparse
from typing import Sequence

from lipschitz_personalize.trainer.memory import ORDER

from .data import DEFAULT_SEED
from .experiment import DEFAULT_LAMBDAS, ToyConfig, run_toy
from .model import matched_sum_sq_scale
from .tables import format_table, markdown_comparison_table, markdown_table


def parse_seeds(text: str) -> list[int]:
    """``"0-7"``, ``"0,3,5"``, ``"4"``, ``"0-3,8"`` -> a list of distinct seeds, in order."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty seed in {text!r}")
        lo, sep, hi = part.partition("-")
        if sep:
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"seed range {part!r} runs backwards")
            seeds.extend(range(a, b + 1))
        else:
            seeds.append(int(part))
    if any(v < 0 for v in seeds):
        raise ValueError(f"seeds must be >= 0: {text!r}")
    return list(dict.fromkeys(seeds))


def _scale_arg(text: str) -> float:
    return matched_sum_sq_scale() if text == "matched" else float(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for toy.json and toy.png")
    parser.add_argument("--epochs-pretrain", type=int, default=1000)
    parser.add_argument("--epochs-finetune", type=int, default=5000)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument("--no-dreambooth", action="store_true", help="skip the DreamBooth-style baseline")
    parser.add_argument("--samples-per-class", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    parser.add_argument("--seeds", default=str(DEFAULT_SEED),
                        help="seeds to run: '0-7', '0,3,5', '4' (default: 0); the figure shows the first")
    parser.add_argument("--compare-sum-sq", type=float, nargs="*", default=None, metavar="LAMBDA",
                        help="also fine-tune with the sum_sq L_lip at each of these mean_sq lambdas (> 0) "
                             "times --sum-sq-scale (no value: every swept lambda > 0)")
    parser.add_argument("--sum-sq-scale", type=_scale_arg, default=None, metavar="X|matched",
                        help="lambda_sum_sq = lambda_mean_sq * X; default 'matched' = tensors / parameters "
                             f"(= 1/{1 / matched_sum_sq_scale():.0f} for the toy)")
    parser.add_argument("--memory", choices=ORDER, default=None,
                        help="fine-tune in this memory mode (the node's memory input) instead of the paper's defaults")
    parser.add_argument("--fresh-optimizer", action="store_true",
                        help="start the fine-tunes with a fresh Adam instead of continuing pre-training's")
    args = parser.parse_args(argv)
    compare = args.compare_sum_sq
    if compare is not None and not compare:
        compare = [lam for lam in args.lambdas if lam > 0]
    config = ToyConfig(
        seeds=tuple(parse_seeds(args.seeds)),
        pretrain_epochs=args.epochs_pretrain,
        finetune_epochs=args.epochs_finetune,
        lambdas=tuple(args.lambdas),
        dreambooth=not args.no_dreambooth,
        compare_sum_sq=tuple(compare or ()),
        sum_sq_scale=args.sum_sq_scale,
        samples_per_class=args.samples_per_class,
        continue_optimizer=not args.fresh_optimizer,
        memory=args.memory,
    )
    report = run_toy(config, args.out, workers=args.workers, progress=True)
    print(format_table(report))
    print()
    print(markdown_table(report))
    comparison = markdown_comparison_table(report)
    if comparison:
        print(comparison)
