"""Options beside the paper's path: off by default, and each matches the faithful path where it should.

Tolerances, stated once: options that do the same arithmetic in another order or place
(step-in-backward, foreach/fused Adam) must match the default to 1e-6 absolute on the deltas
(step-in-backward bitwise); bf16 compute must stay close (the denoising loss within 2e-2
relative, the deltas' direction cosine > 0.99).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from lipschitz_personalize.trainer.config import ConfigError, TrainConfig
from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer import job
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer

from tiny_models import make_problem

STEPS = 6


def _trainer(steps=STEPS, lr=1e-3, **options):
    model, latents, cond, abar = make_problem()
    delta = ParameterDelta(model)
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
        m.setattr("lipschitz_personalize.trainer.objective.Regularizer.weight_decay", lambda self, delta, lam: None)
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
        m.setattr("lipschitz_personalize.trainer.objective.Regularizer.weight_decay", lambda self, delta, lam: None)
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


def test_step_in_backward_frees_each_gradient_during_backward(monkeypatch):
    """The point of the option: no full set of gradients exists during backward - each bucket
    (here: each tensor) steps and frees its gradients as soon as they are complete."""
    monkeypatch.setattr("lipschitz_personalize.trainer.optim.BUCKET", 1)
    model, t = _trainer(step_in_backward=True, steps=1)
    seen = []
    t.update.optimizer.register_step_post_hook(
        lambda *_: seen.append(sum(p.grad is not None for p in t.delta.tensors())))
    t.step()
    assert len(seen) == len(t.delta.tensors()) and max(seen) <= 1
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


@pytest.mark.parametrize("adam, kernel", [("foreach", "_multi_tensor_adam"), ("fused", "_fused_adam")])
def test_foreach_and_fused_adam_match_the_default(adam, kernel, monkeypatch):
    _, ref = _trainer()
    _, opt = _trainer(adam=adam)
    _run(ref)
    calls = []
    adam_module = importlib.import_module("torch.optim.adam")
    real = getattr(adam_module, kernel)
    monkeypatch.setattr(adam_module, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    _run(opt)
    assert calls  # the requested kernel did the update
    assert _flat(ref).abs().max() > 1e-3  # the deltas moved, so agreeing says something
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


@pytest.mark.parametrize("bad, field", [
    (dict(precision="fp8"), "precision"), (dict(adam="sgd"), "adam"), (dict(steps=0), "steps"),
    (dict(lr=float("nan")), "lr"), (dict(lam=-1.0), "lam"), (dict(resolution=500), "resolution"),
])
def test_bad_config_is_refused_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**bad).validate()
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


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


class _UsedOutOfOrder(torch.nn.Module):
    """Three layers registered a, b, c and called b, a, c: backward completes c, then a, then b,
    so in the delta's layout (reverse registration: c, b, a) one bucket completes while the
    other holds only part of its gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))
        self.requires_grad_(False)

    def forward(self, x, t, cond):
        return self.c(torch.tanh(self.a(torch.tanh(self.b(x)))))


@pytest.mark.parametrize("mode", ["lean", "12gb", "8gb"])
def test_step_in_backward_equals_the_all_at_once_update_when_backward_completes_buckets_out_of_order(mode,
                                                                                                      monkeypatch):
    """A bucket that completes while another holds only part of its gradients steps alone: the
    optimizer steps every tensor that has a gradient, so the early ones were stepped twice."""
    from lipschitz_personalize.trainer.memory import configure

    monkeypatch.setattr("lipschitz_personalize.trainer.optim.BUCKET", 80)  # buckets (c.b c.w b.b) (b.w a.b a.w)
    g = torch.Generator().manual_seed(1)
    data = CachedExamples(torch.randn(6, 8, generator=g), torch.zeros(1, 1))
    deltas = []
    for step_in_backward in (True, False):
        model = _UsedOutOfOrder()
        config = configure(TrainConfig(steps=4, lr=1e-2, lam=50.0), mode)
        config.step_in_backward = step_in_backward
        delta = ParameterDelta(model, dtype=config.delta_torch_dtype)
        trainer = RegularizedTrainer(model, delta, torch.linspace(0.99, 0.01, 1000), data, config)
        if step_in_backward:
            assert [len(b) for b in trainer.update.buckets] == [3, 3]
        _run(trainer)
        deltas.append(_flat(trainer))
    assert torch.equal(*deltas)
