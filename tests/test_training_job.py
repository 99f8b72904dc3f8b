"""The loop and the job that runs it: determinism, cancel, errors, NaN guard, grad mode."""
from __future__ import annotations

import random
import threading
import traceback

import pytest
import torch

from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer import job
from lipschitz_personalize.trainer.config import TrainConfig
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer

from tiny_models import make_problem


def _trainer(steps=12, lr=1e-3, seed=2025, checkpoint=False, prior=False, model_fn=None, **kw):
    model, latents, cond, abar = make_problem()
    prior_data = CachedExamples(torch.randn(4, 4, 8, 8), torch.randn(1, 5, 12)) if prior else None
    config = TrainConfig(steps=steps, lr=lr, seed=seed, **kw)
    blocks = [model.block] if checkpoint else []
    delta = ParameterDelta(model)
    trainer = RegularizedTrainer(model_fn or model, delta, abar, CachedExamples(latents, cond), config,
                                 prior=prior_data, checkpoint=blocks)
    return model, trainer


def _run(trainer, stop=lambda: False):
    events = []
    return job.run(trainer, events.append, stop), events


def _raise_at(trainer, model, step: int, exc: BaseException) -> None:
    """Make the forward of step ``step + 1`` raise ``exc`` (after the step drew its noise)."""
    def broken(x, t, c):
        if trainer.step_count == step:
            raise exc
        return model(x, t, c)

    trainer.model_fn = broken


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_same_seed_gives_bitwise_identical_deltas_and_one_event_per_step():
    _, a = _trainer()
    _, b = _trainer()
    result, events = _run(a)
    _run(b)
    assert result.status == "completed" and result.steps_done == 12
    assert [e.step for e in events] == list(range(1, 13))
    assert _equal(a.delta.state_dict(), b.delta.state_dict())
    _, c = _trainer(seed=1)
    _run(c)
    assert not _equal(a.delta.state_dict(), c.delta.state_dict())


def test_metrics_per_step():
    _, trainer = _trainer(steps=3)
    _, events = _run(trainer)
    last = events[-1]
    assert last.steps_per_s > 0 and last.eta_s == 0
    m = last
    assert m.denoise > 0 and m.lip > 0 and m.step == 3 and m.total == 3
    # The reported norm and L_lip are those of the delta the run ended with.
    deltas = trainer.delta.tensors()
    assert m.delta_norm == pytest.approx(torch.cat([d.detach().flatten() for d in deltas]).norm().item(), rel=1e-6)
    assert m.lip == pytest.approx(sum(d.detach().square().mean().item() for d in deltas), rel=1e-6)
    assert m.loss == pytest.approx(m.denoise + 500.0 * m.lip)


def test_gradient_checkpointing_recomputes_the_block_instead_of_storing_it_and_gives_the_same_delta():
    """Checkpointing does what it is for: the checkpointed block runs again in backward (a
    forward hook counts its runs) and its activations are not kept for backward (the bytes
    autograd saves during the step, counted by a saved-tensors hook, go down), with the same
    delta."""
    runs = {}
    for checkpoint in (False, True):
        model, trainer = _trainer(steps=4, checkpoint=checkpoint)
        calls, saved = [], []
        # A pre-hook: torch's early stop may end the recomputation inside the block's last op
        # once it has what backward needs, so that op's forward hook need not fire there.
        model.block[0].register_forward_pre_hook(lambda *_: calls.append(1))

        def pack(x):
            saved.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            _run(trainer)
        runs[checkpoint] = trainer, len(calls), sum(saved)
    (plain, plain_calls, plain_saved), (ckpt, ckpt_calls, ckpt_saved) = runs[False], runs[True]
    assert plain_calls == 4, "one forward of the block per step"
    assert ckpt_calls == 8, "checkpointing runs the block once more per step, in backward"
    assert ckpt_saved < plain_saved, (ckpt_saved, plain_saved)
    for k, v in plain.delta.state_dict().items():
        torch.testing.assert_close(ckpt.delta.state_dict()[k], v, rtol=0, atol=1e-6)


def test_prior_preservation_term_is_used():
    _, plain = _trainer(steps=3, lam=0.0)
    _, prior = _trainer(steps=3, lam=0.0, prior=True, prior_weight=1.0)
    _, events = _run(prior)
    _run(plain)
    assert events[-1].prior is not None
    assert not _equal(plain.delta.state_dict(), prior.delta.state_dict())


def test_cancel_stops_within_one_step_and_keeps_a_consistent_partial_delta():
    """ComfyUI's Cancel, set from another thread while a step runs: that step completes, no
    further one starts."""
    gate = threading.Event()
    model, trainer = _trainer(steps=1000)

    def cancelled_mid_step(x, t, c):
        if trainer.step_count == 5:
            gate.set()
        return model(x, t, c)

    trainer.model_fn = cancelled_mid_step
    result, _ = _run(trainer, stop=gate.is_set)
    assert result.status == "cancelled"
    assert result.steps_done == 6
    # The partial delta is exactly the uninterrupted run's delta at that step count.
    _, reference = _trainer(steps=result.steps_done)
    _run(reference)
    assert _equal(trainer.delta.state_dict(), reference.delta.state_dict())
    assert not any(t.name == "lipschitz-train" and t.is_alive() for t in threading.enumerate())


def test_an_error_in_a_step_reaches_the_caller_with_its_traceback():
    model, trainer = _trainer(steps=10)
    _raise_at(trainer, model, 3, RuntimeError("boom in the forward"))
    with pytest.raises(RuntimeError, match="boom in the forward") as info:
        _run(trainer)
    assert "broken" in "".join(traceback.format_tb(info.value.__traceback__))
    assert trainer.step_count == 3


def test_nan_guard_stops_with_a_message_and_keeps_the_last_good_delta():
    model, trainer = _trainer(steps=50, lr=1e-2)

    def explode(x, t, c):
        out = model(x, t, c)
        return out * float("nan") if trainer.step_count == 4 else out

    trainer.model_fn = explode
    result, events = _run(trainer)
    assert result.status == "diverged" and result.steps_done == 4
    assert "learning rate" in result.message
    assert all(torch.isfinite(d).all() for d in trainer.delta.tensors())
    _, reference = _trainer(steps=4, lr=1e-2)
    _run(reference)
    assert _equal(trainer.delta.state_dict(), reference.delta.state_dict())


def test_absurd_learning_rate_diverges_cleanly():
    _, trainer = _trainer(steps=200, lr=1e12)
    result, _ = _run(trainer)
    assert result.status == "diverged", result
    assert all(torch.isfinite(d).all() for d in trainer.delta.tensors())


def test_job_started_from_inference_mode_trains_and_leaves_caller_mode_alone():
    _, trainer = _trainer(steps=3)
    with torch.inference_mode():
        result, _ = _run(trainer)
        assert torch.is_inference_mode_enabled()
    assert result.status == "completed"


def test_resume_from_state_is_bitwise_identical():
    _, full = _trainer(steps=8)
    _run(full)
    _, first = _trainer(steps=8)
    first.config.steps = 3
    _run(first)
    state = first.state_dict()
    _, resumed = _trainer(steps=8)
    resumed.load_state_dict(state)
    _run(resumed)
    assert resumed.step_count == 8
    assert _equal(full.delta.state_dict(), resumed.delta.state_dict())


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps"), (dict(lr=0.0), "learning rate"), (dict(lr=float("nan")), "learning rate"),
    (dict(lam=-1.0), "lambda"), (dict(lam=float("nan")), "lambda"), (dict(regularizer="l3"), "regularizer"),
])
def test_bad_hyperparameters_are_refused_before_training(bad, match):
    with pytest.raises(ValueError, match=match):
        _trainer(**bad)


def test_base_weights_are_never_written():
    model, trainer = _trainer(steps=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(trainer)
    assert _equal(before, model.state_dict())
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # torch's default, left as it was
    assert all(p.grad is None for p in model.parameters()), "the base got gradients written onto it"


def test_resume_after_a_step_that_raised_mid_forward_is_bitwise_identical():
    """An interrupt lands inside a step that already drew its noise: the saved state must not
    be one draw ahead."""
    _, full = _trainer(steps=8)
    _run(full)
    model, broken = _trainer(steps=8)
    _raise_at(broken, model, 3, KeyboardInterrupt("interrupt inside the U-Net forward"))
    with pytest.raises(KeyboardInterrupt):
        _run(broken)
    state = broken.state_dict()
    _, resumed = _trainer(steps=8)
    resumed.load_state_dict(state)
    resumed.load_state_dict(state)  # loading the same state twice must not share Adam's tensors
    _run(resumed)
    assert _equal(full.delta.state_dict(), resumed.delta.state_dict())


# -- the thread it runs in (the host's: ComfyUI's worker thread, the benchmark's job) -------------
def _os_name() -> str:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return f.read().strip()


def test_the_run_trains_in_the_callers_thread_named_while_it_trains():
    _, trainer = _trainer()
    seen = []
    caller = threading.get_ident()
    own_name = _os_name()

    def on_step(m):
        seen.append((m.step, threading.get_ident(), _os_name()))

    with torch.inference_mode():  # as ComfyUI calls a node
        result = job.run(trainer, on_step)
        assert torch.is_inference_mode_enabled()
    assert result.status == "completed" and result.steps_done == 12
    assert [s for s, _, _ in seen] == list(range(1, 13))
    assert {ident for _, ident, _ in seen} == {caller}
    assert {name for _, _, name in seen} == {job.THREAD_NAME}  # visible in top -H while it trains
    assert _os_name() == own_name  # and the host's thread gets its own name back


def test_an_error_in_on_step_stops_the_run_after_that_step():
    _, trainer = _trainer(steps=10)

    def interrupted(m):  # ComfyUI's progress bar raises on Cancel
        if m.step == 2:
            raise KeyboardInterrupt("cancel from the progress bar")

    with pytest.raises(KeyboardInterrupt):
        job.run(trainer, interrupted)
    assert trainer.step_count == 2


class _Interrupted(Exception):
    """What a host raises when the user cancels (ComfyUI: InterruptProcessingException)."""


class _HostLinear(torch.nn.Linear):
    """A layer that checks for a cancel request at its entry, as ComfyUI's layers do (also when
    backward recomputes them); a request raises once (ComfyUI clears its flag as it raises).
    Here only the first layer checks: backward recomputes it last, after the later layers'
    tensors have stepped."""

    requested = False

    def __init__(self, *args, checks: bool = False) -> None:
        super().__init__(*args)
        self.checks = checks

    def forward(self, x):
        if self.checks and _HostLinear.requested and torch._C._current_graph_task_id() != -1:  # in backward
            _HostLinear.requested = False
            raise _Interrupted("cancelled during the backward's recompute")
        return super().forward(x)


def _checkpointed_trainer(steps: int):
    from lipschitz_personalize.trainer.memory import configure

    torch.manual_seed(0)
    units = [torch.nn.Sequential(_HostLinear(8, 32, checks=True), torch.nn.SiLU()),
             torch.nn.Sequential(_HostLinear(32, 32), torch.nn.SiLU()), torch.nn.Sequential(_HostLinear(32, 8))]
    model = torch.nn.Sequential(*units).requires_grad_(False)
    config = configure(TrainConfig(steps=steps, lr=1e-2, lam=50.0), "lean")  # fp32 delta, Adam inside backward
    data = CachedExamples(torch.randn(6, 8), torch.zeros(1, 1))
    return RegularizedTrainer(lambda x, t, c: model(x), ParameterDelta(model), torch.linspace(0.99, 0.01, 1000),
                              data, config, checkpoint=units)


def test_a_cancel_during_the_backward_recompute_leaves_a_state_that_resumes_bitwise(monkeypatch):
    """lean steps each tensor inside backward (here each tensor is a bucket): a cancel raised by
    a layer while backward recomputes it must not leave half a step behind."""
    monkeypatch.setattr("lipschitz_personalize.trainer.optim.BUCKET", 1)
    steps = 8
    at = random.randrange(1, steps - 1)  # the step during whose backward the user cancels
    full = _checkpointed_trainer(steps)
    _run(full)
    cancelled = _checkpointed_trainer(steps)

    def on_step(metrics):
        _HostLinear.requested = metrics.step == at

    with pytest.raises(_Interrupted):
        job.run(cancelled, on_step)
    assert not _HostLinear.requested  # it did fire inside backward
    state = cancelled.state_dict()
    resumed = _checkpointed_trainer(steps)
    resumed.load_state_dict(state)
    _run(resumed)
    assert resumed.step_count == steps
    assert _equal(full.delta.state_dict(), resumed.delta.state_dict()), f"cancelled in step {at + 1}"
    ours, theirs = full.update.state_dict()["state"], resumed.update.state_dict()["state"]
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in ours for k in ours[i])
