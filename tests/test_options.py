"""Options beside the paper's path: off by default, and each matches the faithful path where it should.

Tolerances, stated once: options that do the same arithmetic in another order or place
(step-in-backward, foreach/fused Adam) must match the default to 1e-6 absolute on the deltas
(step-in-backward bitwise); bf16 compute must stay close (the denoising loss within 2e-2
relative, the deltas' direction cosine > 0.99).
"""
from __future__ import annotations

import pytest
import torch

from lipschitz_personalize.trainer.config import ConfigError, TrainConfig
from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer import job
from lipschitz_personalize.trainer.lowrank import LowRankDelta
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer
from lipschitz_personalize.trainer.objective import paper_regularizer

from tiny_models import make_problem

STEPS = 6


def _trainer(steps=STEPS, lr=1e-3, delta_cls=ParameterDelta, **options):
    model, latents, cond, abar = make_problem()
    delta = delta_cls(model)
    config = TrainConfig(steps=steps, lr=lr, **options)
    return model, RegularizedTrainer(model, delta, abar, CachedExamples(latents, cond), config)


def _run(trainer, n=None):
    return [trainer.step() for _ in range(n or trainer.config.steps)]


def _flat(trainer):
    return torch.cat([d.detach().flatten() for d in trainer.delta.tensors()])


def _metrics(ms):
    return [{k: v for k, v in m.as_dict().items() if k != "seconds"} for m in ms]


def test_the_default_update_is_plain_adam_whose_only_weight_decay_is_the_regularizer():
    _, t = _trainer(lam=500.0)
    opt = t.update.optimizer
    assert type(opt) is torch.optim.Adam
    for group in opt.param_groups:
        assert group["foreach"] is None and group["fused"] is None and not group["amsgrad"]
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["lr"] == 1e-3
        # 2 * lambda / numel: the gradient of lambda * mean(delta^2), nothing else.
        for p in group["params"]:
            assert group["weight_decay"] == pytest.approx(2 * 500.0 / p.numel(), rel=1e-12)
    _, plain = _trainer(lam=0.0)
    assert [g["weight_decay"] for g in plain.update.optimizer.param_groups] == [0.0]


@pytest.mark.parametrize("kind", ["mean_sq", "sum_sq"])
@pytest.mark.parametrize("step_in_backward", [False, True])
def test_weight_decay_groups_equal_the_closed_form_over_20_steps(kind, step_in_backward, monkeypatch):
    """Adam's coupled weight decay c_i * delta_i is the closed-form L_lip gradient, step for step
    (bitwise on CPU: the same ``grad + c_i * delta_i`` with the same c_i)."""
    options = dict(steps=20, lam=500.0 if kind == "mean_sq" else 0.05, regularizer=kind,
                   step_in_backward=step_in_backward)
    _, grouped = _trainer(**options)
    assert grouped.update.decay is not None
    with monkeypatch.context() as m:
        m.setattr("trainer.objective.Regularizer.weight_decay", lambda self, delta, lam: None)
        _, closed = _trainer(**options)
    assert closed.update.decay is None
    m_grouped, m_closed = _run(grouped), _run(closed)
    assert torch.equal(_flat(grouped), _flat(closed))
    assert _flat(grouped).abs().max() > 1e-3  # it moved
    assert m_grouped[-1].lip == pytest.approx(m_closed[-1].lip, rel=1e-5)
    # The two keep the same resume layout: the closed-form run continues the grouped one exactly.
    _, more_grouped = _trainer(**{**options, "steps": 22})
    more_grouped.load_state_dict(grouped.state_dict())
    with monkeypatch.context() as m:
        m.setattr("trainer.objective.Regularizer.weight_decay", lambda self, delta, lam: None)
        _, more_closed = _trainer(**{**options, "steps": 22})
    more_closed.load_state_dict(grouped.state_dict())
    _run(more_grouped, 2), _run(more_closed, 2)
    assert torch.equal(_flat(more_grouped), _flat(more_closed))


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


def test_step_in_backward_frees_each_gradient_during_backward():
    """The point of the option: no full set of gradients exists after backward."""
    model, t = _trainer(step_in_backward=True, steps=1)
    seen = []
    t.update.optimizers[0].register_step_post_hook(
        lambda *_: seen.append(sum(p.grad is not None for p in t.delta.tensors())))
    t.step()
    assert seen and max(seen) <= 1
    assert all(p.grad is None for p in t.delta.tensors())


class _NanGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward (a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_step_in_backward_reports_a_non_finite_gradient():
    model, t = _trainer(step_in_backward=True, steps=3)

    def poisoned(x, tt, c):
        out = model(x, tt, c)
        return _NanGradient.apply(out) if t.step_count == 1 else out

    t.model_fn = poisoned
    result = job.run(t, lambda m: None)
    assert result.status == "diverged" and "step_in_backward" in result.message


@pytest.mark.parametrize("adam", ["foreach", "fused"])
def test_foreach_and_fused_adam_match_the_default(adam):
    _, ref = _trainer()
    _, opt = _trainer(adam=adam)
    _run(ref), _run(opt)
    torch.testing.assert_close(_flat(opt), _flat(ref), rtol=0, atol=1e-6)


def test_bf16_is_close_and_keeps_fp32_master_deltas():
    _, ref = _trainer()
    _, amp = _trainer(precision="bf16")
    m_ref, m_amp = _run(ref), _run(amp)
    assert all(d.dtype == torch.float32 for d in amp.delta.tensors())
    assert not torch.equal(_flat(ref), _flat(amp))  # it really computed in bf16
    for a, b in zip(m_ref, m_amp):
        assert b.denoise == pytest.approx(a.denoise, rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(_flat(ref), _flat(amp), dim=0)
    assert cos > 0.99, cos


def test_lowrank_delta_trains_with_lip_on_b_times_a():
    model, t = _trainer(steps=10, delta_cls=lambda m: LowRankDelta(m, rank=2), lam=500.0)
    d = t.delta
    assert d.numel() < ParameterDelta(model).numel() / 2
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
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
    t.regularizer.add_grad_(d, 500.0)
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
    # The model computes with theta0 + B @ A inside applied(), and its base is untouched.
    _, latents, cond, _ = make_problem()
    x, tt = latents[:1], torch.tensor([10])
    merged_weights = {n: base_before[n] + merged[n] for n in names}
    expected = torch.func.functional_call(model, merged_weights, (x, tt, cond))
    with torch.no_grad(), d.applied():
        got = model(x, tt, cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters())


def test_adam_8bit_is_optional():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install bitsandbytes"):
            _trainer(adam="8bit")
        return
    _, t = _trainer(adam="8bit")
    _run(t)
    assert _flat(t).abs().max() > 0


@pytest.mark.parametrize("bad, field", [
    (dict(precision="fp8"), "precision"), (dict(adam="sgd"), "adam"), (dict(steps=0), "steps"),
    (dict(lr=float("nan")), "lr"), (dict(lam=-1.0), "lam"), (dict(resolution=500), "resolution"),
])
def test_bad_config_is_refused_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**bad).validate()
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


@pytest.mark.parametrize("options, field", [(dict(step_in_backward=True), "step_in_backward"),
                                            (dict(regularizer="l1"), "regularizer")])
def test_lowrank_refuses_what_it_cannot_compute(options, field):
    with pytest.raises(ConfigError) as err:
        _trainer(delta_cls=lambda m: LowRankDelta(m, rank=2), **options)
    assert err.value.field == field


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 2e-3), (torch.bfloat16, 5e-3)])
def test_half_precision_storage_keeps_a_trained_delta(dtype, bound):
    """The node stores deltas in fp16 by default: after the paper's learning rate, the stored
    values are the trained ones to a fraction of a percent of ||delta|| (fp16 keeps 3 more
    mantissa bits than bf16; its narrower range only costs the tiniest entries)."""
    _, t = _trainer(steps=20, lr=2e-6)
    _run(t)
    full = torch.cat([d.flatten() for d in t.delta.state_dict().values()])
    stored = torch.cat([d.flatten() for d in t.delta.state_dict(dtype).values()])
    assert stored.dtype == dtype
    err = ((stored.float() - full).norm() / full.norm()).item()
    assert 0 < err < bound, err
