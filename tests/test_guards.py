"""Guards for the ComfyUI users run, which this CPU cannot run for real.

Current ComfyUI (read in its source, not run: see docs/reliability.md) turns dynamic VRAM on by default,
and ``--novram``/``--lowvram`` or a short card load the U-Net partially; ``--use-sage-attention``
swaps attention for a kernel with no backward pass.  Without a GPU ComfyUI never takes these
paths, so each guard is driven here by the closest honest stand-in: a real 0.3.75 patcher that
reports ``is_dynamic()``, a real U-Net with a tensor on another device (``meta``), and ComfyUI's
own attention dispatch pointed at a kernel that refuses backward.  The dynamic-VRAM refusal also
runs through a real server (``tests/test_reliability_inputs.py``, ``dynamic-vram``).
"""
from __future__ import annotations

import pytest
import torch

from test_persistence import _pack_module


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt), output_vae=False, output_clip=False)[0]


def test_a_dynamic_model_without_a_non_dynamic_copy_is_refused_naming_the_flag(model):
    adapter = _pack_module("nodes.host.adapter")
    errors = _pack_module("nodes.host.errors")
    dynamic = model.clone()
    dynamic.is_dynamic = lambda: True  # 0.3.75's clone() takes no disable_dynamic
    with pytest.raises(errors.NodeInputError) as err:
        adapter.trainable(dynamic)
    assert err.value.input_name == "model" and "dynamic VRAM" in err.value.problem
    assert "--disable-dynamic-vram" in err.value.fix
    assert adapter.trainable(model) == (model, None)  # a plain patcher is trained as it is


def test_a_dynamic_model_is_trained_through_its_non_dynamic_copy(model):
    """Current ComfyUI: ``clone(disable_dynamic=True)`` rebuilds a plain ModelPatcher.  The
    stand-in's copies are plain only when asked for with that flag (and, in the second case,
    not even then): which patcher trains, or the refusal, is the adapter's decision."""
    adapter = _pack_module("nodes.host.adapter")
    errors = _pack_module("nodes.host.errors")
    copies = []

    class Dynamic(type(model)):
        copy_stays_dynamic = False

        def is_dynamic(self):
            return True

        def clone(self, disable_dynamic=False):
            copy = model.clone()
            copy.is_dynamic = lambda: not disable_dynamic or self.copy_stays_dynamic
            copies.append(copy)
            return copy

    dynamic = Dynamic(model.model, model.load_device, model.offload_device)
    patcher, note = adapter.trainable(dynamic)
    assert patcher is copies[-1] and not patcher.is_dynamic(), "the training must take the non-dynamic copy"
    assert "non-dynamic copy" in note
    loaded = adapter.load_for_training(patcher, torch.float32)
    assert loaded.device == torch.device(patcher.load_device)

    dynamic.copy_stays_dynamic = True
    with pytest.raises(errors.NodeInputError) as err:
        adapter.trainable(dynamic)
    assert "the copy is still dynamic" in err.value.problem and "--disable-dynamic-vram" in err.value.fix


def test_a_weight_left_off_the_training_device_is_refused_naming_novram(model):
    adapter = _pack_module("nodes.host.adapter")
    errors = _pack_module("nodes.host.errors")
    unet = model.model.diffusion_model
    named = list(unet.named_parameters())
    adapter.require_on_device(named, torch.device("cpu"))  # all there: no error
    stray = [(n, torch.empty(p.shape, device="meta") if i == 7 else p) for i, (n, p) in enumerate(named)]
    with pytest.raises(errors.NodeInputError) as err:
        adapter.require_on_device(stray, torch.device("cpu"))
    assert "1 U-Net weights are on meta" in err.value.problem and named[7][0] in err.value.problem
    assert "--novram or --lowvram" in err.value.fix


def test_training_under_sage_attention_uses_an_attention_with_a_backward(model, monkeypatch):
    import comfy.ldm.modules.attention as attention
    import comfy.model_management

    adapter = _pack_module("nodes.host.adapter")
    calls = []

    @attention.wrap_attn
    def forward_only(*args, **kwargs):  # like SageAttention's kernel: no backward
        calls.append(1)
        with torch.no_grad():
            return attention.attention_pytorch(*args, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", forward_only)
    monkeypatch.setattr(comfy.model_management, "sage_attention_enabled", lambda: True)
    assert "SageAttention" in adapter.sage_note()
    loaded = adapter.load_for_training(model, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g, requires_grad=True)
    t, cond = torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)
    with torch.inference_mode(False), torch.enable_grad():
        loaded.eps(x, t, cond).square().mean().backward()
        assert not calls, "the training reached the forward-only kernel"
        through_override, x.grad = x.grad, None
        # Without the override ComfyUI's dispatch reaches the forward-only kernel and the
        # attention's share of the gradient silently vanishes.
        loaded.unet(x, t, context=cond).float().square().mean().backward()
        assert calls and not torch.allclose(x.grad, through_override, rtol=1e-3, atol=1e-6)
