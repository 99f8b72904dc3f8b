"""The closed-form L_lip gradient is the paper's autograd loss, step for step."""
from __future__ import annotations

import copy

import pytest
import torch

from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer.config import REGULARIZERS as KINDS, ConfigError, TrainConfig
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer, q_sample
from lipschitz_personalize.trainer.objective import Regularizer, denoise_loss, paper_regularizer

from tiny_models import make_problem

LAM = 500.0


def _paper_loss(model, params0, x_t, t, cond, eps, lam, kind):
    """The paper's formulation: a trainable copy, a frozen copy, one autograd loss."""
    params = [p for p in model.parameters()]
    return denoise_loss(model(x_t, t, cond), eps) + lam * paper_regularizer(params, params0, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_equals_autograd_of_paper_loss(kind):
    # float64, so that the comparison sees the maths and not fp32's rounding of theta0 + delta
    # in the paper's stored copy.
    model, latents, cond, abar = make_problem()
    model, latents, cond = model.double(), latents.double(), cond.double()
    g = torch.Generator().manual_seed(1)
    x0 = latents[:1]
    t = torch.randint(1000, (1,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = (abar[t].double().sqrt() * x0 + (1 - abar[t].double()).sqrt() * eps).double()

    # Ours: delta at a non-trivial point, denoise backprop + closed-form regularizer.
    delta = ParameterDelta(model)
    with torch.no_grad():
        for d in delta.tensors():
            d.copy_(torch.randn(d.shape, generator=g, dtype=torch.float64) * 1e-2)
    with delta.applied():
        denoise_loss(model(x_t, t, cond), eps).backward()
    reg = Regularizer(kind)
    reg.add_grad_(delta, LAM)
    ours = torch.cat([gr.flatten() for gr in delta.grads()])

    # Paper: theta = theta0 + delta as a trainable copy, autograd over the summed loss.
    paper = copy.deepcopy(model)
    params0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, d in zip(paper.parameters(), delta.tensors()):
            p.add_(d)
    _paper_loss(paper, params0, x_t, t, cond, eps, LAM, kind).backward()
    ref = torch.cat([p.grad.flatten() for p in paper.parameters()])

    assert (ours - ref).norm() / ref.norm() < 1e-6
    # The regularizer's value is the paper's too.
    with torch.no_grad():
        value_ref = paper_regularizer(list(paper.parameters()), params0, kind)
    lip, norm = reg.measure(delta)
    assert lip.item() == pytest.approx(value_ref.item(), rel=1e-5)
    assert norm.item() == pytest.approx(torch.cat([d.flatten() for d in delta.tensors()]).norm().item(), rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_adam_trajectory_equals_paper_over_20_steps(kind):
    model, latents, cond, abar = make_problem()
    config = TrainConfig(steps=20, lr=1e-3, lam=LAM, regularizer=kind, seed=7)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}

    delta = ParameterDelta(model)
    trainer = RegularizedTrainer(model, delta, abar, CachedExamples(latents, cond), config)
    for _ in range(config.steps):
        trainer.step()

    # The paper's loop with the same draws from the same generator.
    paper = copy.deepcopy(model)
    params0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(paper.parameters(), lr=config.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)
    data = CachedExamples(latents, cond)
    for _ in range(config.steps):
        x0, c = data.sample(g)
        t = torch.randint(1000, (1,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        opt.zero_grad()
        _paper_loss(paper, params0, q_sample(x0, abar[t], eps), t, c, eps, LAM, kind).backward()
        opt.step()

    worst = max(
        (p0 + d - p).abs().max().item()
        for p0, d, p in zip(params0, delta.tensors(), paper.parameters())
    )
    assert worst < 1e-5
    assert max(d.abs().max().item() for d in delta.tensors()) > 1e-4  # it did move
    # The base weights were never written.
    assert all(torch.equal(base_before[k], v) for k, v in model.state_dict().items())


def test_mean_sq_is_per_tensor_mean_not_sum():
    """lambda=500 must mean what it means in the reference code (F.mse_loss per tensor)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 5))  # weight 5x2 (10 elements), bias 5
    delta = ParameterDelta(model)
    with torch.no_grad():
        delta.delta["0.weight"].fill_(2.0)
        delta.delta["0.bias"].fill_(-1.0)
    assert Regularizer("mean_sq").measure(delta)[0].item() == pytest.approx(4.0 + 1.0)
    assert Regularizer("sum_sq").measure(delta)[0].item() == pytest.approx(40.0 + 5.0)
    assert Regularizer("l1").measure(delta)[0].item() == pytest.approx(2.0 + 1.0)


def test_unknown_kind_is_refused():
    with pytest.raises(ConfigError, match="regularizer: unknown kind"):
        Regularizer("l2_typo")
