"""The 2-D toy (paper section 4.3 / appendix F): a shortened run reproduces the paper's claims.

The run goes through the shipped ``RegularizedTrainer``/``ParameterDelta``; the schedule is cut
to 200 pre-training and 500 fine-tuning epochs (``python -m trainer.toy --seeds 0-7 --out docs``
runs the full schedule and sweep, see ``docs/toy.md``).  At this schedule single seeds vary a
lot, so no seed is hand-picked: the run covers the first ``len(SEEDS)`` seeds, each pre-trained
once and fine-tuned for every setting, and the claims are asserted on the median over them (the
structural ones on every seed).  Everything is seeded, so the numbers are deterministic on a
given machine.

The thresholds come from the short schedule over seeds 0-11 (the comment above them records
what those runs gave, ``docs/toy.md`` too), and every threshold sits between the
regularized and the unregularized values with a margin on both sides, so removing the
regularizer (lambda = 50 -> 0) fails the preservation claims; that is checked too.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from trainer import toy

# The first five seeds (a rule, not a choice by results; five, not three, because a median of
# three short runs moves a lot with the seeds, see below).
SEEDS = tuple(range(5))
# The lambdas the claims are about (the full sweep adds 1 and 100; each setting is seeded on
# its own, so leaving some out does not change the others' numbers).
LAMBDAS = (0.0, 50.0, 1000.0, 10000.0)
SHORT = {"pretrain_epochs": 200, "finetune_epochs": 500}
FIELDS = {"preservation", "preservation_mean", "preservation_min", "adaptation", "delta_norm", "seconds"}

# What the short schedule gave over seeds 0-11 (python -m trainer.toy --seeds 0-11
# --epochs-pretrain 200 --epochs-finetune 500 --lambdas 0 50 1000 10000), per seed min..max,
# median over 0-11, and median over SEEDS (0-4):
#   pretrained  worst-class  0.97..0.99, 0.982;  adaptation 0.00..0.48, 0.21 (0-4: 0.10)
#   lambda=0    mean pres    0.60..0.89, 0.784 (0-4: 0.786);  worst class 0.07..0.76, 0.477 (0-4: 0.490)
#               adaptation   0.98..0.99
#   lambda=50   mean pres    0.68..0.98, 0.925 (0-4: 0.933);  worst class 0.13..0.97, 0.769 (0-4: 0.779)
#   lambda=1e3  mean pres    0.62..0.99, 0.934 (0-4: 0.933);  worst class 0.09..0.99, 0.817 (0-4: 0.818)
#               adaptation   0.94..0.99, 0.966 (0-4: 0.966)
#   lambda=1e4  mean pres    0.45..0.98, 0.938 (0-4: 0.958);  worst class 0.01..0.98, 0.890 (0-4: 0.916)
#               adaptation   0.46..0.99, 0.873 (0-4: 0.881)
#   DreamBooth  class 0      0.98..0.99;  adaptation 0.98..0.99
#   ||delta|| falls with lambda (0, 50, 1e3, 1e4) on every one of the 12 seeds.
# Seeds 1, 10 and 11 keep less than 0.35 of some base class at lambda = 50 and 1000 (seed 11
# even at 10000): single short runs are fragile, hence the medians over several seeds.
# Thresholds on medians over SEEDS, each with a margin of >= 0.06 on its side, and the two
# preservation thresholds also fail lambda = 0 (checked below), i.e. removing the regularizer:
PRETRAINED_MIN = 0.9  # pretrained: every base class covered
COLLAPSE_MAX = 0.6  # lambda = 0: median worst-class preservation below this (0.49)
PRESERVE_MEAN = 0.87  # lambda >= 50: median mean preservation above this (>= 0.93; lambda = 0: 0.79)
PRESERVE_MIN = 0.65  # lambda >= 50: median worst-class preservation above this (>= 0.78; lambda = 0: 0.49)
ADAPT_MIN = 0.9  # lambda <= 1000: the new class is learned (>= 0.96)
DREAMBOOTH_CLASS0 = 0.9  # (0.98)


@pytest.fixture(scope="module", params=[None, "8gb"], ids=["paper", "memory-8gb"])
def short_run(request, tmp_path_factory):
    """The short run with the paper's settings, and again with the fine-tunes in the leanest
    memory mode (8-bit Adam moments, a bf16 delta, the anchor stored in fp16): every claim
    below must hold in both.  ``12gb`` (bf16 moments, fp32 delta) passed them too when run
    with ``params=["12gb"]``; it is left out of ``make test`` for time (about 4 minutes)."""
    out = tmp_path_factory.mktemp("toy")
    report = toy.run_toy(out, lambdas=LAMBDAS, seeds=list(SEEDS), memory=request.param, **SHORT)
    return out, report


def _median(report, name, key):
    return report["summary"][name][key]["median"]


def test_outputs_written(short_run):
    out, report = short_run
    on_disk = json.loads((out / "toy.json").read_text())
    expected = {"pretrained", "dreambooth", *(f"lambda_{lam:g}" for lam in LAMBDAS)}
    assert on_disk["config"]["seeds"] == list(SEEDS)
    assert set(on_disk["per_seed"]) == {str(s) for s in SEEDS}
    for seed in SEEDS:
        settings = on_disk["per_seed"][str(seed)]["settings"]
        assert set(settings) == expected
        for name, metrics in settings.items():
            assert FIELDS <= set(metrics), name
            assert set(metrics["preservation"]) == {str(c) for c in range(toy.N_BASE)}
            assert math.isclose(metrics["preservation_mean"], sum(metrics["preservation"].values()) / toy.N_BASE)
    # The single-seed layout is kept: the first seed's (the figure's) settings.
    assert on_disk["settings"] == on_disk["per_seed"][str(SEEDS[0])]["settings"]
    assert on_disk["per_seed"] == json.loads(json.dumps(report["per_seed"]))
    assert set(on_disk["summary"]) == expected
    for name, entry in on_disk["summary"].items():
        for key in ("preservation_mean", "preservation_min", "adaptation", "adaptation_gain"):
            vals = entry[key]["per_seed"]
            assert len(vals) == len(SEEDS)
            assert entry[key]["worst"] == min(vals)
            assert min(vals) <= entry[key]["median"] <= max(vals)
    with Image.open(out / "toy.png") as img:
        assert img.width >= 800 and img.height >= 400
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert set(toy.COLOURS) <= colours  # every class drawn in its own colour


def test_markdown_table_is_a_function_of_the_json(short_run):
    out, report = short_run
    table = toy.markdown_table(json.loads((out / "toy.json").read_text()))
    assert table == toy.markdown_table(report)
    rows = table.strip().splitlines()
    assert len(rows) == 2 + 1 + len(LAMBDAS) + 1  # header, rule, pretrained, lambdas, DreamBooth
    assert "pretrained (untrained baseline" in rows[2] and "DreamBooth" in rows[-1]
    base = report["summary"]["pretrained"]["adaptation"]
    assert f"{base['median']:.3f} ({base['worst']:.3f})" in rows[2]
    assert f"seeds ({SEEDS[0]}-{SEEDS[-1]})" in rows[0]
    # No timing in it: changing every "seconds" leaves the table as it is.
    shifted = json.loads(json.dumps(report))
    for seed in shifted["per_seed"].values():
        for m in seed["settings"].values():
            m["seconds"] += 1.0
    shifted["total_seconds"] += 1.0
    assert toy.markdown_table(shifted) == table


def test_pretrained_model_covers_the_base_classes(short_run):
    assert _median(short_run[1], "pretrained", "preservation_min") > PRETRAINED_MIN


def test_no_regularization_loses_a_base_class(short_run):
    assert _median(short_run[1], "lambda_0", "preservation_min") < COLLAPSE_MAX


@pytest.mark.parametrize("lam", [50.0, 1000.0, 10000.0])
def test_regularization_preserves_the_base_classes(short_run, lam):
    name = f"lambda_{lam:g}"
    assert _median(short_run[1], name, "preservation_mean") > PRESERVE_MEAN, short_run[1]["summary"][name]
    assert _median(short_run[1], name, "preservation_min") > PRESERVE_MIN, short_run[1]["summary"][name]


def test_the_preservation_claim_needs_the_regularizer(short_run):
    """The thresholds are not loose: lambda = 0 in place of lambda = 50 fails both."""
    report = short_run[1]
    assert _median(report, "lambda_0", "preservation_mean") < PRESERVE_MEAN
    assert _median(report, "lambda_0", "preservation_min") < PRESERVE_MIN


@pytest.mark.parametrize("lam", [0.0, 50.0, 1000.0])
def test_new_class_is_learned(short_run, lam):
    report = short_run[1]
    assert _median(report, f"lambda_{lam:g}", "adaptation") > ADAPT_MIN
    # ... far above what the untrained class-5 embedding gives (gains >= 0.5 measured).
    assert _median(report, f"lambda_{lam:g}", "adaptation_gain") > 0.4


def test_very_large_lambda_holds_the_new_class_back(short_run):
    """Appendix F: a very large lambda pulls the new class toward the existing modes."""
    report = short_run[1]
    assert _median(report, "lambda_10000", "adaptation") < _median(report, "lambda_0", "adaptation") - 0.05


def test_delta_norm_decreases_with_lambda(short_run):
    for seed in SEEDS:
        settings = short_run[1]["per_seed"][str(seed)]["settings"]
        norms = [settings[f"lambda_{lam:g}"]["delta_norm"] for lam in LAMBDAS]
        assert all(a > b for a, b in zip(norms, norms[1:])), (seed, norms)


def test_dreambooth_keeps_class_0(short_run):
    report = short_run[1]
    assert _median(report, "dreambooth", "preservation_class0") > DREAMBOOTH_CLASS0
    assert _median(report, "dreambooth", "adaptation") > ADAPT_MIN


# -- the pieces --------------------------------------------------------------------------
def test_parse_seeds():
    assert toy.parse_seeds("0-7") == list(range(8))
    assert toy.parse_seeds("0,3,5") == [0, 3, 5]
    assert toy.parse_seeds("4") == [4]
    assert toy.parse_seeds("0-2,9,1") == [0, 1, 2, 9]
    assert toy.parse_seeds(3) == [3]
    for bad in ("", "3-1", "a", "1,,2"):
        with pytest.raises(ValueError):
            toy.parse_seeds(bad)


def test_matched_sum_sq_scale():
    shapes = toy.parameter_shapes()
    n = sum(math.prod(s) for s in shapes.values())
    assert (len(shapes), n) == (8, 12178)
    assert math.isclose(toy.matched_sum_sq_scale(), 8 / 12178)
    # mean_sq's per-element weight on the 6x8 class embedding vs the 96x96 matrix.
    assert shapes["class_emb.weight"] == (6, 8) and shapes["net.2.weight"] == (96, 96)


def test_seeds_and_workers_do_not_change_the_numbers(tmp_path):
    """A seed's numbers do not depend on the other seeds run, the worker count or the order."""
    tiny = {"pretrain_epochs": 2, "finetune_epochs": 2, "samples_per_class": 30, "lambdas": (0.0, 50.0)}
    both = toy.run_toy(None, seeds="1,0", workers=2, compare_sum_sq=[50.0], **tiny)
    alone = toy.run_toy(None, seed=0, workers=1, compare_sum_sq=[50.0], **tiny)

    def strip(settings):
        return {k: {f: v for f, v in m.items() if f != "seconds"} for k, m in settings.items()}

    assert strip(both["per_seed"]["0"]["settings"]) == strip(alone["per_seed"]["0"]["settings"])
    assert both["config"]["figure_seed"] == 1 and alone["config"]["seeds"] == [0]
    sum_sq = alone["settings"]["sum_sq_lambda_50"]
    assert sum_sq["regularizer"] == "sum_sq" and math.isclose(sum_sq["lam"], 50 * toy.matched_sum_sq_scale())
    assert "sum_sq" in toy.markdown_comparison_table(alone) and "sum_sq" not in toy.markdown_table(alone)


def test_cli_default_is_one_seed(tmp_path, capsys):
    toy.main(["--out", str(tmp_path), "--epochs-pretrain", "1", "--epochs-finetune", "1", "--samples-per-class", "20",
              "--lambdas", "0", "--no-dreambooth", "--workers", "1"])
    report = json.loads((tmp_path / "toy.json").read_text())
    assert report["config"]["seeds"] == [0] and set(report["per_seed"]) == {"0"}
    assert set(report["settings"]) == {"pretrained", "lambda_0"}
    assert "| pretrained (untrained baseline" in capsys.readouterr().out


def test_epoch_batches_visit_every_point_once_per_epoch():
    x = torch.arange(1000, dtype=torch.float32)[:, None]
    data = toy.EpochBatches(x, torch.zeros(1000, dtype=torch.long), batch_size=512)
    g = torch.Generator().manual_seed(0)
    assert data.batches_per_epoch == 2
    for _ in range(3):
        batches = [data.sample(g)[0] for _ in range(data.batches_per_epoch)]
        assert [b.shape[0] for b in batches] == [512, 488]
        assert sorted(torch.cat(batches).flatten().tolist()) == list(range(1000))


def test_schedule_and_centres():
    betas = toy.cosine_betas()
    abar = toy.alphas_cumprod(betas)
    assert betas.shape == (toy.T,) and (betas > 0).all() and (betas <= 0.999).all()
    assert abar[0] > 0.999 and abar[-1] < 1e-3
    c = toy.centres()
    assert torch.allclose(c[: toy.N_BASE].norm(dim=1), torch.full((toy.N_BASE,), toy.RADIUS))
    assert torch.equal(c[toy.NEW_CLASS], torch.zeros(2))


def test_finetunes_start_from_the_same_state():
    """Each fine-tune gets its own copy of the pre-training Adam state (Adam updates in place)."""
    points = toy.make_points()
    pretrained, adam_state, _ = toy._pretrain(2, points)
    setting = toy.Setting("lambda_0", 0.0)
    runs = [toy._finetune(setting, 3, pretrained, adam_state, points, 20) for _ in range(2)]
    assert runs[0]["metrics"]["delta_norm"] == runs[1]["metrics"]["delta_norm"]
    assert torch.equal(runs[0]["samples"], runs[1]["samples"])
