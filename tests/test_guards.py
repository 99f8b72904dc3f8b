"""Guards for the ComfyUI users run, which this CPU cannot run for real.

Current ComfyUI (read in its source, not run: see docs/reliability.md) turns dynamic VRAM on by default,
and ``--novram``/``--lowvram`` or a short card load the U-Net partially; ``--use-sage-attention``,
``--use-flash-attention`` and ``--use-ck-attention`` swap attention for a kernel with no backward
pass.  Without a GPU ComfyUI never takes these paths, so each guard is driven here by the closest
honest stand-in: a real 0.3.75 patcher that reports ``is_dynamic()``, a real U-Net with a tensor
on another device (``meta``), and ComfyUI's own attention dispatch pointed at stand-in kernels (no
backward, a custom op without autograd, the split variant) and, through a real server,
``--use-split-cross-attention``.  The dynamic-VRAM refusal also runs through a real server
(``tests/test_reliability_inputs.py``, ``dynamic-vram``).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from fault_pack.harness import make_server
from test_anchor import _train_on, fp32_ckpt  # noqa: F401 - fp32_ckpt is a fixture

pytestmark = pytest.mark.usefixtures("comfy_in_process")  # the pack's ComfyUI side in this process



@pytest.fixture(scope="module")
def model(tiny_ckpt):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt), output_vae=False, output_clip=False)[0]


def test_a_dynamic_model_without_a_non_dynamic_copy_is_refused_naming_the_flag(model):
    from lipschitz_personalize.nodes.host import model as host_model
    from lipschitz_personalize.trainer import errors
    dynamic = model.clone()
    dynamic.is_dynamic = lambda: True  # 0.3.75's clone() takes no disable_dynamic
    with pytest.raises(errors.NodeInputError) as err:
        host_model.trainable(dynamic)
    assert err.value.input_name == "model" and "dynamic VRAM" in err.value.problem
    assert "--disable-dynamic-vram" in err.value.fix
    assert host_model.trainable(model) == (model, None)  # a plain patcher is trained as it is


def test_a_dynamic_model_is_trained_through_its_non_dynamic_copy(model):
    """Current ComfyUI: ``clone(disable_dynamic=True)`` rebuilds a plain ModelPatcher.  The
    stand-in's copies are plain only when asked for with that flag (and, in the second case,
    not even then): which patcher trains, or the refusal, is the host's decision."""
    from lipschitz_personalize.nodes.host import model as host_model
    from lipschitz_personalize.trainer import errors
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
    patcher, note = host_model.trainable(dynamic)
    assert patcher is copies[-1] and not patcher.is_dynamic(), "the training must take the non-dynamic copy"
    assert "non-dynamic copy" in note
    loaded = host_model.load_for_training(patcher, torch.float32)
    assert loaded.device == torch.device(patcher.load_device)

    dynamic.copy_stays_dynamic = True
    with pytest.raises(errors.NodeInputError) as err:
        host_model.trainable(dynamic)
    assert "the copy is still dynamic" in err.value.problem and "--disable-dynamic-vram" in err.value.fix


def test_a_weight_left_off_the_training_device_is_refused_naming_novram(model):
    from lipschitz_personalize.nodes.host import model as host_model
    from lipschitz_personalize.trainer import errors
    unet = model.model.diffusion_model
    named = list(unet.named_parameters())
    host_model.require_on_device(named, torch.device("cpu"))  # all there: no error
    stray = [(n, torch.empty(p.shape, device="meta") if i == 7 else p) for i, (n, p) in enumerate(named)]
    with pytest.raises(errors.NodeInputError) as err:
        host_model.require_on_device(stray, torch.device("cpu"))
    assert "1 U-Net weights are on meta" in err.value.problem and named[7][0] in err.value.problem
    assert "--novram or --lowvram" in err.value.fix


def _split_heads(q, k, v, heads):
    b, n, c = q.shape
    return [t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]


@torch.library.custom_op("lipschitz_test::forward_only_attention", mutates_args=())
def _forward_only_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Like ``--use-flash-attention``'s ``torch.library`` op: a forward, no autograd formula."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _stand_in(kind: str, calls: list):
    """An attention function as ComfyUI calls it, standing in for a backend this CPU lacks."""
    import comfy.ldm.modules.attention as attention

    if kind == "split":  # ComfyUI's own: a backward, different arithmetic
        return attention.attention_split

    @attention.wrap_attn
    def backend(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                **kwargs):
        calls.append(kind)
        if kind == "no-grad":  # like SageAttention's kernel: no backward
            with torch.no_grad():
                return attention.attention_pytorch(q, k, v, heads, **kwargs)
        out = _forward_only_op(*_split_heads(q, k, v, heads))
        return out.transpose(1, 2).reshape(q.shape)

    backend.__name__ = {"no-grad": "attention_sage", "custom-op": "attention_flash"}[kind]
    return backend


def _delta_after_two_steps(model) -> dict[str, torch.Tensor]:
    """The node's training (``run._trainer`` on ``load_for_training``), two faithful steps."""
    from lipschitz_personalize.nodes.host import model as host_model
    from lipschitz_personalize.nodes.host import run
    from lipschitz_personalize.nodes.host.anchor import Anchor
    from lipschitz_personalize.trainer.config import TrainConfig

    anchor = Anchor(torch.float32, None, "", "the model")
    config = TrainConfig(steps=2, lr=1e-4, lam=500.0, seed=3, resolution=64)
    g = torch.Generator().manual_seed(4)
    latents, cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.inference_mode(False):
        trainer = run._trainer(host_model.load_for_training(model, torch.float32), anchor, latents, cond, None, config)
        trainer.step(), trainer.step()
        return {n: d.detach().clone() for n, d in trainer.delta.delta.items()}


@pytest.mark.parametrize("kind", ["no-grad", "custom-op", "split"])
def test_training_computes_pytorchs_attention_whatever_backend_comfyui_runs(model, monkeypatch, kind):
    """SageAttention's kernel has no backward (the attention's gradient vanishes), FlashAttention's
    custom op has none (backward fails), the split variant has its own arithmetic: with any of
    them as ComfyUI's attention the training moves the delta exactly as with PyTorch's, and the
    node names the backend it replaced."""
    import comfy.ldm.modules.attention as attention

    from lipschitz_personalize.nodes.host import attention as host_attention
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    assert host_attention.attention_note() is None
    reference = _delta_after_two_steps(model)
    calls = []
    monkeypatch.setattr(attention, "optimized_attention", _stand_in(kind, calls))
    trained = _delta_after_two_steps(model)
    assert max(float(d.abs().max()) for d in reference.values()) > 1e-5  # the steps moved the delta
    for name, d in reference.items():
        assert torch.equal(trained[name], d), name
    assert not calls, "the training reached the backend"
    expected = {"no-grad": "SageAttention", "custom-op": "FlashAttention", "split": "--use-split-cross-attention"}
    assert expected[kind] in host_attention.attention_note()


def test_a_server_started_with_split_attention_trains_the_default_servers_delta(tmp_path_factory, tiny_ckpt,
                                                                                fp32_ckpt):
    """ComfyUI 0.3.75 on a CPU samples with sub-quadratic attention by default and with the split
    variant under --use-split-cross-attention: the two servers train the same delta, bit for bit,
    and the node says which attention it replaced."""
    split = make_server(tmp_path_factory.mktemp("split_attention") / "comfy", tiny_ckpt)
    split.extra_args.append("--use-split-cross-attention")
    with split:
        result_split, texts_split, delta_split = _train_on(split, fp32_ckpt)
    # A fresh default server too: the session's may hold this run already and reload it untrained.
    default = make_server(tmp_path_factory.mktemp("default_attention") / "comfy", tiny_ckpt)
    with default:
        result, texts, delta = _train_on(default, fp32_ckpt)
    assert result_split.status == result.status == "success", (result_split.error, result.error)
    assert any("split cross attention (--use-split-cross-attention)" in t for t in texts_split), texts_split
    assert any("sub-quadratic attention" in t for t in texts), texts
    assert delta_split.keys() == delta.keys()
    assert all(torch.equal(delta_split[k], delta[k]) for k in delta)
    for server in (split, default):
        shutil.rmtree(server.base_dir, ignore_errors=True)
