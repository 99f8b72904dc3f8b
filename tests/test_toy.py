"""The 2-D toy (paper section 4.3 / appendix F): a shortened run reproduces the paper's claims.

The experiment lives in ``tools/toy/`` (not in the shipped pack) and trains through the shipped
``RegularizedTrainer``/``ParameterDelta``; the schedule is cut
to 200 pre-training and 500 fine-tuning epochs (``python -m tools.toy --seeds 0-7 --out docs``
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

import pytest
import torch
from PIL import Image

from lipschitz_personalize.trainer.objective import paper_regularizer
from tools.toy import cli, data, model, tables
from tools.toy.experiment import Setting, ToyConfig, _finetune, _pretrain, run_toy
from tools.toy.figure import COLOURS

# The first five seeds (a rule, not a choice by results; five, not three, because a median of
# three short runs moves a lot with the seeds, see below).
SEEDS = tuple(range(5))
# The lambdas the claims are about (the full sweep adds 1 and 100; each setting is seeded on
# its own, so leaving some out does not change the others' numbers).
LAMBDAS = (0.0, 50.0, 1000.0, 10000.0)
SHORT = {"pretrain_epochs": 200, "finetune_epochs": 500}

# What the short schedule gave over seeds 0-11 (python -m tools.toy --seeds 0-11
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
    report = run_toy(ToyConfig(seeds=SEEDS, lambdas=LAMBDAS, memory=request.param, **SHORT), out)
    return out, report


def _median(report, name, key):
    return report["summary"][name][key]["median"]


def test_outputs_written(short_run):
    """toy.json holds every seed's settings and what was returned; toy.png draws every class."""
    out, report = short_run
    on_disk = json.loads((out / "toy.json").read_text())
    expected = {"pretrained", "dreambooth", *(f"lambda_{lam:g}" for lam in LAMBDAS)}
    assert set(on_disk["per_seed"]) == {str(s) for s in SEEDS}
    assert all(set(seed["settings"]) == expected for seed in on_disk["per_seed"].values())
    assert set(on_disk["summary"]) == expected
    assert on_disk["per_seed"] == json.loads(json.dumps(report["per_seed"]))
    with Image.open(out / "toy.png") as img:
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert set(COLOURS) <= colours  # every class drawn in its own colour


def test_markdown_table_is_a_function_of_the_json(short_run):
    out, report = short_run
    table = tables.markdown_table(json.loads((out / "toy.json").read_text()))
    assert table == tables.markdown_table(report)
    rows = table.strip().splitlines()
    assert len(rows) == 2 + 1 + len(LAMBDAS) + 1  # header, rule, pretrained, lambdas, DreamBooth
    assert "pretrained (untrained baseline" in rows[2] and "DreamBooth" in rows[-1]
    # No timing in it: changing every "seconds" leaves the table as it is.
    shifted = json.loads(json.dumps(report))
    for seed in shifted["per_seed"].values():
        for m in seed["settings"].values():
            m["seconds"] += 1.0
    shifted["total_seconds"] += 1.0
    assert tables.markdown_table(shifted) == table


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
    assert cli.parse_seeds("0-7") == list(range(8))
    assert cli.parse_seeds("0,3,5") == [0, 3, 5]
    assert cli.parse_seeds("0-2,9,1") == [0, 1, 2, 9]
    for bad in ("", "3-1", "a", "1,,2"):
        with pytest.raises(ValueError):
            cli.parse_seeds(bad)


def test_the_matched_sum_sq_lambda_gives_the_same_penalty_for_an_even_delta():
    """``lambda * matched_sum_sq_scale()`` with ``sum_sq`` penalises a delta spread evenly over
    every parameter as ``lambda`` with ``mean_sq`` does (the trainer's own L_lip), while a delta
    on the small class embedding alone is penalised far less (what the comparison is about)."""
    params0 = [p.detach() for p in model.ToyEpsModel().parameters()]
    lam = 50.0
    even = [p0 + 0.01 for p0 in params0]
    mean_sq = lam * paper_regularizer(even, params0, "mean_sq")
    sum_sq = lam * model.matched_sum_sq_scale() * paper_regularizer(even, params0, "sum_sq")
    assert torch.allclose(mean_sq, sum_sq, rtol=1e-5)
    names = [n for n, _ in model.ToyEpsModel().named_parameters()]
    small = [p0 + 0.01 * (n == "class_emb.weight") for n, p0 in zip(names, params0)]
    assert lam * model.matched_sum_sq_scale() * paper_regularizer(small, params0, "sum_sq") \
        < 0.1 * lam * paper_regularizer(small, params0, "mean_sq")


def test_seeds_and_workers_do_not_change_the_numbers():
    """A seed's numbers do not depend on the other seeds run, the worker count or the order."""
    tiny = {"pretrain_epochs": 2, "finetune_epochs": 2, "samples_per_class": 30, "lambdas": (0.0, 50.0),
            "compare_sum_sq": (50.0,)}
    both = run_toy(ToyConfig(seeds=(1, 0), **tiny), workers=2)
    alone = run_toy(ToyConfig(seeds=(0,), **tiny), workers=1)

    def strip(settings):
        return {k: {f: v for f, v in m.items() if f != "seconds"} for k, m in settings.items()}

    assert strip(both["per_seed"]["0"]["settings"]) == strip(alone["per_seed"]["0"]["settings"])
    assert "sum_sq" in tables.markdown_comparison_table(alone) and "sum_sq" not in tables.markdown_table(alone)


def test_the_cli_prints_the_table_of_the_json_it_writes(tmp_path, capsys):
    """What docs/toy.md's command does: toy.json and toy.png written, the printed table is the
    one rendered from that toy.json."""
    cli.main(["--out", str(tmp_path), "--epochs-pretrain", "1", "--epochs-finetune", "1", "--samples-per-class", "20",
              "--lambdas", "0", "--no-dreambooth", "--workers", "1"])
    assert (tmp_path / "toy.png").is_file()
    assert tables.markdown_table(json.loads((tmp_path / "toy.json").read_text())) in capsys.readouterr().out


def test_epoch_batches_visit_every_point_once_per_epoch():
    x = torch.arange(1000, dtype=torch.float32)[:, None]
    batches_of = data.EpochBatches(x, torch.zeros(1000, dtype=torch.long), batch_size=512)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batches = [batches_of.sample(g)[0] for _ in range(batches_of.batches_per_epoch)]
        assert sorted(torch.cat(batches).flatten().tolist()) == list(range(1000))


def test_the_schedule_ends_in_pure_noise():
    abar = model.alphas_cumprod(model.cosine_betas())
    assert abar[0] > 0.999 and abar[-1] < 1e-3 and (abar[1:] < abar[:-1]).all()


def test_finetunes_start_from_the_same_state():
    """Each fine-tune gets its own copy of the pre-training Adam state (Adam updates in place)."""
    points = data.make_points()
    pretrained, adam_state, _ = _pretrain(2, points)
    setting = Setting("lambda_0", 0.0)
    runs = [_finetune(setting, 3, pretrained, adam_state, points, 20) for _ in range(2)]
    assert runs[0]["metrics"]["delta_norm"] == runs[1]["metrics"]["delta_norm"]
    assert torch.equal(runs[0]["samples"], runs[1]["samples"])
