"""TF32 is a stated choice: a run computes in strict fp32 unless its config asks for TF32, and
the process's flags are as they were afterwards (every host trains through ``trainer.job.run``:
the node, the headless benchmark; ``tools/bench_gpu.py`` is checked in ``test_bench_gpu.py``)."""
from __future__ import annotations

import pytest
import torch

from tiny_models import make_problem
from lipschitz_personalize.trainer import job
from lipschitz_personalize.trainer.config import ConfigError, TrainConfig
from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer
from lipschitz_personalize.trainer.precision import tf32_flags


@pytest.fixture
def flags():
    """Restore whatever the process had, whatever a test leaves."""
    saved = tf32_flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("tf32", [False, True])
def test_a_run_trains_with_the_tf32_flags_its_config_states_and_restores_them(flags, tf32):
    model, latents, cond, abar = make_problem()
    seen = []

    def model_fn(x, t, c):
        seen.append(tf32_flags())
        return model(x, t, c)

    trainer = RegularizedTrainer(model_fn, ParameterDelta(model), abar, CachedExamples(latents, cond),
                                 TrainConfig(steps=2, lr=1e-3, tf32=tf32))
    before = (not tf32, not tf32)  # the host left the opposite of what the run asks
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert job.run(trainer, lambda m: None).status == "completed"
    assert seen == [(tf32, tf32)] * 2
    assert tf32_flags() == before


def test_the_flags_are_restored_when_a_run_fails(flags):
    model, latents, cond, abar = make_problem()

    def broken(x, t, c):
        raise RuntimeError("a layer failed")

    trainer = RegularizedTrainer(broken, ParameterDelta(model), abar, CachedExamples(latents, cond),
                                 TrainConfig(steps=2, lr=1e-3))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    with pytest.raises(RuntimeError, match="a layer failed"):
        job.run(trainer, lambda m: None)
    assert tf32_flags() == (True, True)


def test_tf32_must_be_a_boolean():
    with pytest.raises(ConfigError) as err:
        TrainConfig(tf32="yes").validate()
    assert err.value.field == "tf32"
