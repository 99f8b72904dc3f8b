"""The preview's maths and choices (trainer/preview.py, trainer/memory.py): no ComfyUI needed.
The previews themselves run through a real server (tests/test_server_nodes.py) and browser
(tests/test_browser.py)."""
from __future__ import annotations

import pytest
import torch

from lipschitz_personalize.trainer.memory import between_steps, estimate
from lipschitz_personalize.trainer.preview import PreviewSettings, default_prompts, drift, parse_prompts


def test_default_prompts_are_the_instance_prompt_and_the_same_without_the_token():
    assert default_prompts("a photo of  sks dog") == ("a photo of sks dog", "a photo of dog")
    assert default_prompts("a photo of sks dog", class_prompt="a photo of a dog") == \
        ("a photo of sks dog", "a photo of a dog")
    assert parse_prompts("\n a cat \n\nsks dog on a beach\n", "a photo of sks dog") == ("a cat", "sks dog on a beach")
    assert parse_prompts("  \n", "a photo of sks dog") == ("a photo of sks dog", "a photo of dog")


def test_previews_fall_every_n_steps_after_a_resumed_start_and_none_when_off():
    every = PreviewSettings(every=100, prompts=("p",), sampler_steps=20, size=256, seed=0)
    assert every.steps(0, 1000) == list(range(100, 1001, 100))
    assert every.steps(250, 520) == [300, 400, 500]
    assert PreviewSettings(0, ("p",), 20, 256, 0).steps(0, 1000) == []


def test_drift_is_the_rms_pixel_distance_of_the_probes_only():
    g = torch.Generator().manual_seed(0)
    base = [torch.rand(1, 8, 8, 3, generator=g) for _ in range(3)]
    moved = [base[0] + 0.5, base[1] + 0.1, base[2] - 0.3]  # the instance prompt's image is not a probe
    assert drift(moved, base) == pytest.approx((0.1 + 0.3) / 2)
    assert drift(base, base) == 0.0
    assert drift(moved[:1], base[:1]) is None


def test_feature_drift_is_one_minus_the_probes_mean_cosine_in_the_encoders_space():
    g = torch.Generator().manual_seed(0)
    base = [torch.rand(1, 4, 4, 3, generator=g) for _ in range(3)]
    moved = [torch.rand(1, 4, 4, 3, generator=g) for _ in range(3)]
    embed = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731 - the pixels as features
    cos = [torch.nn.functional.cosine_similarity(embed(m), embed(b)).item() for m, b in zip(moved[1:], base[1:])]
    assert drift(moved, base, embed) == pytest.approx(1 - sum(cos) / 2)
    assert drift(base, base, embed) == pytest.approx(0.0, abs=1e-6)
    assert drift(moved[:1], base[:1], embed) is None


def test_a_preview_may_use_the_steps_activations_and_the_plans_headroom_only():
    plan = estimate("lean", params=859_520_964, largest=14_745_600, anchor_bytes=4, resolution=512)
    assert between_steps(plan, plan.total) == plan.parts["activations"]
    assert between_steps(plan, plan.total + 1e9) == plan.parts["activations"] + 1e9
    assert between_steps(plan, plan.total - 1e9) == plan.parts["activations"]
