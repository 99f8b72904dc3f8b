"""Speed/memory options: off by default, and each matches the faithful path where it should.

Tolerances, stated once: options that do the same arithmetic in another order or place
(step-in-backward, foreach/fused Adam, no-sync metrics, channels_last) must match the default
to 1e-6 absolute on the deltas (most are bitwise); reduced-precision autocast must stay close
(bf16/fp16: the denoising loss within 2e-2 relative, the deltas' direction cosine > 0.99).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.delta import ParameterDelta
from trainer.job import TrainingJob
from trainer.lowrank import LowRankDelta
from trainer.loop import CachedExamples, RegularizedTrainer, TrainConfig
from trainer.objective import paper_regularizer

from tiny_models import make_problem

STEPS = 6


def _trainer(steps=STEPS, lr=1e-3, delta_cls=ParameterDelta, model_map=None, **options):
    model, latents, cond, abar = make_problem()
    if model_map is not None:
        model = model_map(model)
    delta = delta_cls(model)
    config = TrainConfig(steps=steps, lr=lr, **options)
    return model, RegularizedTrainer(model, delta, abar, CachedExamples(latents, cond), config)


def _run(trainer, n=None):
    return [trainer.step().resolve() for _ in range(n or trainer.config.steps)]


def _flat(trainer):
    return torch.cat([d.detach().flatten() for d in trainer.delta.tensors()])


def _metrics(ms):
    return [{k: v for k, v in m.as_dict().items() if k != "seconds"} for m in ms]


def test_defaults_are_the_faithful_path():
    c = TrainConfig()
    assert (c.autocast, c.adam, c.sync_metrics, c.step_in_backward, c.channels_last) == (
        "off", "default", True, False, False)
    _, t = _trainer()
    assert type(t.optimizer) is torch.optim.Adam
    assert t.optimizer.defaults["foreach"] is None and t.optimizer.defaults["fused"] is None


def test_step_in_backward_is_bitwise_the_faithful_step_and_resumes_interchangeably():
    _, ref = _trainer()
    _, sib = _trainer(step_in_backward=True)
    m_ref, m_sib = _run(ref), _run(sib)
    assert torch.equal(_flat(ref), _flat(sib))
    assert _metrics(m_ref) == _metrics(m_sib)
    # Its optimizer state has the single-Adam layout: a plain trainer continues from it exactly.
    _, plain = _trainer(steps=STEPS + 2)
    plain.load_state_dict(sib.state_dict())
    _, ref8 = _trainer(steps=STEPS + 2)
    _run(ref8)
    _run(plain, 2)
    assert torch.equal(_flat(ref8), _flat(plain))


@pytest.mark.parametrize("adam", ["foreach", "fused"])
def test_foreach_and_fused_adam_match_the_default(adam):
    _, ref = _trainer()
    _, opt = _trainer(adam=adam)
    _run(ref), _run(opt)
    torch.testing.assert_close(_flat(opt), _flat(ref), rtol=0, atol=1e-6)


def test_no_sync_metrics_equal_sync_metrics():
    _, sync = _trainer(adam="fused")
    _, nosync = _trainer(adam="fused", sync_metrics=False)
    pending = [nosync.step() for _ in range(STEPS)]  # nothing read back yet
    assert all(m._pending is not None for m in pending)
    m_sync = _run(sync)
    assert _metrics(m_sync) == _metrics(pending)  # as_dict() resolves
    assert torch.equal(_flat(sync), _flat(nosync))


def test_no_sync_divergence_is_reported_with_the_last_good_delta():
    model, trainer = _trainer(steps=50, lr=1e-2, adam="fused", sync_metrics=False)

    def explode(x, t, c):
        out = model(x, t, c)
        return out * float("nan") if trainer.step_count == 4 else out

    trainer.model_fn = explode
    job = TrainingJob(trainer).start()
    result = job.wait(60)
    assert result.status == "diverged" and result.steps_done == 4, result
    _, ref = _trainer(steps=4, lr=1e-2, adam="fused")
    _run(ref)
    assert torch.equal(_flat(ref), _flat(trainer))


def test_channels_last_matches():
    _, ref = _trainer()
    _, cl = _trainer(channels_last=True, model_map=lambda m: m.to(memory_format=torch.channels_last))
    assert cl.delta.delta["conv_in.weight"].is_contiguous(memory_format=torch.channels_last)
    _run(ref), _run(cl)
    torch.testing.assert_close(_flat(cl), _flat(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_is_close_and_keeps_fp32_master_deltas(autocast):
    _, ref = _trainer()
    _, amp = _trainer(autocast=autocast)
    if autocast == "fp16":
        assert amp.loss_scale == 2.0**16
        amp.loss_scale = 2.0**8  # this tiny model overflows fp16 at 2^16: start where it does not
    m_ref, m_amp = _run(ref), _run(amp)
    assert amp.loss_scale in (1.0, 2.0**8)
    assert all(d.dtype == torch.float32 for d in amp.delta.tensors())
    for a, b in zip(m_ref, m_amp):
        assert b.denoise == pytest.approx(a.denoise, rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(_flat(ref), _flat(amp), dim=0)
    assert cos > 0.99, cos


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    _, amp = _trainer(autocast="fp16", steps=1)
    amp.loss_scale = 2.0**60  # the scaled gradient surely overflows
    before = _flat(amp).clone()
    m = amp.step()
    assert amp.loss_scale == 2.0**59 and m.step == 1
    assert torch.equal(before, _flat(amp))  # no update, no divergence error


def test_lowrank_delta_trains_with_lip_on_b_times_a():
    model, t = _trainer(steps=10, delta_cls=lambda m: LowRankDelta(m, rank=2), lam=500.0)
    d = t.delta
    assert d.numel() < ParameterDelta(model).numel() / 2
    ms = _run(t)
    merged = d.merged_state_dict()
    assert max(v.abs().max().item() for v in merged.values()) > 1e-4  # it moved
    # L_lip and ||delta|| are those of the effective delta B @ A.
    base = dict(model.named_parameters())
    names = list(merged)
    lip = paper_regularizer([base[n].detach() + merged[n] for n in names], [base[n] for n in names])
    assert ms[-1].lip == pytest.approx(lip.item(), rel=1e-4)
    assert ms[-1].delta_norm == pytest.approx(torch.cat([v.flatten() for v in merged.values()]).norm().item(), rel=1e-4)
    # The closed-form factor gradient is autograd's gradient of lam * L_lip(B @ A).
    for p in d.tensors():
        p.grad = None
    d.add_regularizer_grad_(t.regularizer, 500.0)
    closed = [p.grad.clone() for p in d.tensors()]
    for p in d.tensors():
        p.grad = None
    # (theta - theta0 = B @ A exactly: autograd through the delta itself, not base + delta - base,
    # whose fp32 rounding would be all this comparison sees.)
    zeros = [torch.zeros_like(base[n]) for n in names]
    eff = [d.summed(n, z) for n, z in zip(names, zeros)]
    (500.0 * paper_regularizer(eff, zeros)).backward()
    for c, p in zip(closed, d.tensors()):
        torch.testing.assert_close(c, p.grad, rtol=1e-4, atol=1e-9)
    # The base was never written, and the delta applies through the same hooks.
    with d.applied():
        assert model.conv_in.weight is base["conv_in.weight"]


def test_adam_8bit_is_optional():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="bitsandbytes"):
            _trainer(adam="8bit")
        return
    _, t = _trainer(adam="8bit")
    _run(t)
    assert _flat(t).abs().max() > 0


@pytest.mark.parametrize("bad, match", [
    (dict(autocast="fp8"), "autocast"), (dict(adam="sgd"), "adam"),
    (dict(sync_metrics=False), "fused"), (dict(step_in_backward=True, autocast="fp16"), "fp16"),
])
def test_bad_option_combinations_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad).validate()


def test_options_are_plain_config_fields():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"autocast", "adam", "sync_metrics", "step_in_backward", "channels_last"} <= names
