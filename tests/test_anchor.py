"""theta0 is the checkpoint's own values where ComfyUI holds the U-Net narrower (fp16 on GPUs).

On a GPU ComfyUI stores SD1.5's U-Net in fp16, so an anchor taken from the loaded model would be
the fp16-rounded checkpoint.  The faithful modes read theta0 from the file instead.  The CPU
stand-in for a GPU's storage is ComfyUI's own ``--fp16-unet`` (fp16 weights, fp32 compute by
manual cast), in-process (``model_options={"dtype": torch.float16}``) and in a real server.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault_pack.harness import make_server
from tools.graphs import install_subject, loader, personalize_inputs, sample
from lipschitz_personalize.trainer.config import TrainConfig
from lipschitz_personalize.trainer.delta import ParameterDelta
from lipschitz_personalize.trainer.loop import CachedExamples, RegularizedTrainer
from lipschitz_personalize.trainer.memory import configure

FP32 = "anchor_fp32.safetensors"

pytestmark = pytest.mark.usefixtures("comfy_in_process")  # the pack's ComfyUI side in this process


@pytest.fixture(scope="module")
def fp32_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with values fp16 cannot hold exactly, as v1-5-pruned-emaonly's."""
    g = torch.Generator().manual_seed(0)
    values = {k: (v.float() * (1 + 1e-3 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v)
              for k, v in load_file(str(tiny_ckpt)).items()}
    path = tmp_path_factory.mktemp("anchor") / "checkpoints" / FP32
    path.parent.mkdir()
    save_file(values, str(path))
    return path


@pytest.fixture(scope="module")
def models(fp32_ckpt):
    """The same file loaded as ComfyUI does on a CPU (fp32) and on a GPU (fp16)."""
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(fp32_ckpt.parent))
    return {dtype: comfy.sd.load_checkpoint_guess_config(str(fp32_ckpt), output_vae=False, output_clip=False,
                                                         model_options={"dtype": dtype})[0]
            for dtype in (torch.float32, torch.float16)}


def _graph_to_loader() -> dict:
    """The prompt graph as ComfyUI passes it: our node's model input straight from the loader."""
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FP32}},
            "train": {"class_type": "LipschitzPersonalize", "inputs": {"model": ["ckpt", 0]}}}


def _train(unet, anchor=None, steps: int = 3, lr: float = 1e-4) -> torch.Tensor:
    return torch.cat([d.reshape(-1) for d in _train_delta(unet, anchor, steps, lr).values()])


def _train_delta(unet, anchor=None, steps: int = 3, lr: float = 1e-4) -> dict[str, torch.Tensor]:
    delta = ParameterDelta(unet, anchor=anchor)
    g = torch.Generator().manual_seed(5)
    data = CachedExamples(torch.randn(3, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g))
    config = configure(TrainConfig(steps=steps, lr=lr, lam=500.0, seed=1), "faithful")
    abar = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
    trainer = RegularizedTrainer(lambda x, t, c: unet(x, t.float(), context=c).float(), delta, abar, data, config)
    with torch.inference_mode(False):
        for _ in range(steps):
            trainer.step()
    return delta.state_dict()


def test_an_fp16_held_model_trains_against_the_files_fp32_values(models):
    from lipschitz_personalize.nodes.host import anchor as host_anchor
    unet32, unet16 = (models[d].model.diffusion_model for d in (torch.float32, torch.float16))
    assert next(unet16.parameters()).dtype == torch.float16

    anchor = host_anchor.choose_anchor(models[torch.float16], unet16, _graph_to_loader(), "train")
    assert anchor.file is not None and anchor.file.name == FP32 and anchor.dtype == torch.float32, anchor
    assert anchor.why.startswith(f"from the checkpoint file {FP32}") and "float16" in anchor.why
    theta0 = host_anchor.read_anchor(anchor, unet16, torch.device("cpu"))
    assert all(torch.equal(theta0[n], p) for n, p in unet32.named_parameters()), "theta0 is not the file's values"

    # Training the fp16-held model against the file trains exactly what the fp32 model trains;
    # against its own fp16 weights it does not.
    reference = _train(unet32)
    assert torch.equal(_train(unet16, theta0), reference)
    rounded = _train(unet16)
    assert (rounded - reference).norm() > 1e-3 * reference.norm(), "the fp16 anchor made no difference"
    # The shared base was never written.
    assert all(p.dtype == torch.float16 for p in unet16.parameters())


def test_where_the_model_is_the_files_values_or_unknown_it_is_the_anchor(models, fp32_ckpt):
    from lipschitz_personalize.nodes.host import anchor as host_anchor
    m32, m16 = models[torch.float32], models[torch.float16]
    held = host_anchor.choose_anchor(m32, m32.model.diffusion_model, _graph_to_loader(), "train")
    assert held.file is None and held.dtype == torch.float32 and FP32 in held.why  # fp32 holds the file exactly
    unknown = host_anchor.choose_anchor(m16, m16.model.diffusion_model, {"train": {"inputs": {"model": ["lora", 0]}},
                                                                     "lora": {"class_type": "LoraLoader"}}, "train")
    assert unknown.file is None and unknown.dtype == torch.float16 and "does not come straight" in unknown.why
    patched = m16.clone()
    name = next(k for k in patched.model.state_dict() if k.startswith("diffusion_model."))
    patched.add_patches({name: ("diff", (torch.zeros(patched.model.state_dict()[name].shape),))})
    lora = host_anchor.choose_anchor(patched, patched.model.diffusion_model, _graph_to_loader(), "train")
    assert lora.file is None and "weight patches" in lora.why
    # Current ComfyUI records the loader call on the patcher (kept by clone): found without a graph.
    import comfy.sd
    recorded = m16.clone()
    recorded.cached_patcher_init = (comfy.sd.load_checkpoint_guess_config, (str(fp32_ckpt), False, False, False))
    assert host_anchor.choose_anchor(recorded, recorded.model.diffusion_model).file == fp32_ckpt


def _applied(model, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the sampler's layers compute with, minus the base: loads ``model`` as sampling
    does and asks each layer for its weight and bias the way ComfyUI's ops cast them."""
    import comfy.model_management
    import comfy.ops

    comfy.model_management.load_models_gpu([model])
    out = {}
    for name, m in model.model.diffusion_model.named_modules():
        if not hasattr(m, "comfy_cast_weights"):
            continue
        if m.comfy_cast_weights:
            weight, bias = comfy.ops.cast_bias_weight(m, torch.zeros(1, dtype=torch.float32), offloadable=False)
        else:
            weight, bias = m.weight, m.bias
        for attr, t in (("weight", weight), ("bias", bias)):
            if t is not None:
                out[f"{name}.{attr}"] = t.detach().float() - base[f"{name}.{attr}"].float()
    comfy.model_management.unload_all_models()
    return out


def _rel(applied: dict, delta: dict) -> float:
    err = sum(float((applied[k] - delta[k]).square().sum()) for k in delta)
    return (err / sum(float(d.square().sum()) for d in delta.values())) ** 0.5


def test_the_exact_sampling_path_keeps_the_delta_the_fp16_patch_rounds_away(models):
    """Where ComfyUI stores the U-Net in fp16 its diff patch rounds base + delta to fp16; the
    node measures that loss and says so, and ``sampling=exact`` keeps every value."""
    from lipschitz_personalize.nodes.host import anchor as host_anchor
    from lipschitz_personalize.nodes.host import patches as host_patches
    m16 = models[torch.float16]
    unet16 = m16.model.diffusion_model
    base = {n: p.detach().clone() for n, p in unet16.named_parameters()}
    # A real delta: 20 steps of the paper's learning rate against the file's values.
    theta0 = host_anchor.read_anchor(host_anchor.choose_anchor(m16, unet16, _graph_to_loader(), "train"), unet16,
                                 torch.device("cpu"))
    delta = _train_delta(unet16, theta0, steps=20, lr=2e-6)

    patched = _rel(_applied(host_patches.patched_model(m16, delta), base), delta)
    estimate = host_patches.patch_loss(unet16, delta, torch.float16)
    assert patched > 0.01, f"the fp16 patch kept the delta to {patched:.2%}: nothing to show"
    assert abs(estimate - patched) < 0.05 * patched, (estimate, patched)  # the node's sampled figure
    note = host_patches.sampling_note(m16, delta, 1.0, "patch")
    assert note and f"loses {estimate:.1%}" in note and "sampling=exact" in note, note

    exact = _rel(_applied(host_patches.patched_model(m16, delta, sampling="exact"), base), delta)
    # What is left is fp32's rounding of base + delta (the delta is 1e-3 of the weights).
    assert exact < 1e-3 and exact < patched / 100, (exact, patched)
    print(f"\n[sampling] 20 steps at lr 2e-6 on the fp16-held test model: the diff patch loses {patched:.2%} "
          f"(node's sampled estimate {estimate:.2%}), exact {exact:.1e}")
    assert host_patches.sampling_note(m16, delta, 1.0, "exact") is None
    # Neither path wrote the shared base.
    assert all(torch.equal(p, base[n]) for n, p in unet16.named_parameters())


def _train_on(server, fp32_ckpt, sampling: str = "patch", memory: str = "faithful"):
    """Train 3 steps of the fp32 checkpoint on ``server``: (the prompt's result, the node's
    texts, the saved delta or ``None``)."""
    link = server.checkpoints_dir / FP32
    if not link.exists():
        link.symlink_to(fp32_ckpt)
    install_subject(server.input_dir)
    graph = loader(ckpt=FP32)
    graph["train"] = {"class_type": "LipschitzPersonalize",
                      "inputs": personalize_inputs(steps=3, memory=memory, delta_dtype="fp32", seed=77,
                                                   sampling=sampling)}
    sample(graph, ["train", 0], "anchor")
    graph["save"] = {"class_type": "LipschitzSaveDelta", "inputs": {"delta": ["train", 1],
                                                                     "filename_prefix": "anchor"}}
    result = server.client.run(graph, timeout=600)
    if result.status != "success":
        return result, result.texts_for("train"), None
    assert server.client.output_images(result, server.output_dir), "nothing sampled"
    saved = server.base_dir / "models" / result.outputs["save"]["text"][0]
    return result, result.texts_for("train"), load_file(str(saved))


def test_a_server_holding_the_unet_in_fp16_trains_the_fp32_servers_delta(tmp_path_factory, tiny_ckpt, fp32_ckpt,
                                                                          comfy_server):
    """ComfyUI started with --fp16-unet (a GPU's storage, on the CPU) trains the same delta as
    the fp32 server, and its node says where theta0 came from; its MODEL samples with
    ``sampling=exact`` (ComfyUI loading the weight wrappers and computing in fp32)."""
    half = make_server(tmp_path_factory.mktemp("fp16unet") / "comfy", tiny_ckpt)
    half.extra_args.append("--fp16-unet")
    with half:
        result16, texts16, delta16 = _train_on(half, fp32_ckpt, "exact")
    result32, texts32, delta32 = _train_on(comfy_server, fp32_ckpt)
    assert result16.status == result32.status == "success", (result16.error, result32.error)
    plan16 = next(t for t in texts16 if t.startswith("memory: "))
    plan32 = next(t for t in texts32 if t.startswith("memory: "))
    assert f"anchor theta0 in float32 from the checkpoint file {FP32} (ComfyUI holds the model in float16)" in plan16
    assert "anchor theta0 in float32 as ComfyUI loaded the model" in plan32
    assert delta16.keys() == delta32.keys()
    for k in delta32:
        torch.testing.assert_close(delta16[k], delta32[k], rtol=0, atol=1e-7)
    shutil.rmtree(half.base_dir, ignore_errors=True)


def test_a_server_holding_the_unet_in_fp8_trains_against_the_file_and_refuses_the_model_anchor(
        tmp_path_factory, tiny_ckpt, fp32_ckpt, comfy_server):
    """--fp8_e4m3fn-unet: theta0 from the file trains the fp32 server's delta; the modes that
    train against the model as held (12gb, 8gb) are refused before any work with what to do,
    not with torch's "Promotion for Float8 Types is not supported" at step 1."""
    fp8 = make_server(tmp_path_factory.mktemp("fp8unet") / "comfy", tiny_ckpt)
    fp8.extra_args.append("--fp8_e4m3fn-unet")
    with fp8:
        result8, texts8, delta8 = _train_on(fp8, fp32_ckpt)
        refused, _, _ = _train_on(fp8, fp32_ckpt, memory="12gb")
        partials = list((fp8.base_dir / "models" / "lipschitz_deltas").glob("partial_*"))
    assert result8.status == "success", result8.error
    assert any(f"from the checkpoint file {FP32} (ComfyUI holds the model in float8_e4m3fn)" in t for t in texts8)
    _, _, delta32 = _train_on(comfy_server, fp32_ckpt)
    for k in delta32:
        torch.testing.assert_close(delta8[k], delta32[k], rtol=0, atol=1e-7)
    message = refused.error["exception_message"]
    assert refused.status == "error" and "float8_e4m3fn" in message and "memory=faithful" in message, message
    assert "Promotion" not in message and not partials  # refused before any step
    shutil.rmtree(fp8.base_dir, ignore_errors=True)


def test_training_against_the_file_leaves_comfyuis_copy_of_the_unet_unloaded_and_unread(fp32_ckpt, monkeypatch):
    """faithful/lean against the file: ComfyUI's fp16 copy of the U-Net is not loaded for the
    training (on a GPU it stays off the device: 1.7 GB of SD1.5) and never read - with its
    weights on no device at all (``meta``) the node's training moves the delta exactly as with
    them in memory - and the pre-flight estimate counts theta0 only."""
    import comfy.model_management
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(fp32_ckpt.parent))
    from lipschitz_personalize.nodes.host import anchor as host_anchor
    from lipschitz_personalize.nodes.host import model as host_model
    from lipschitz_personalize.nodes.host import run

    m16 = comfy.sd.load_checkpoint_guess_config(str(fp32_ckpt), output_vae=False, output_clip=False,
                                                model_options={"dtype": torch.float16})[0]
    unet = m16.model.diffusion_model
    anchor = host_anchor.choose_anchor(m16, unet, _graph_to_loader(), "train")
    assert anchor.file == fp32_ckpt
    config = TrainConfig(steps=2, lr=1e-4, lam=500.0, seed=8, resolution=64)
    g = torch.Generator().manual_seed(9)
    latents, cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)

    def two_steps(loaded) -> dict[str, torch.Tensor]:
        with torch.inference_mode(False):
            trainer = run._trainer(loaded, anchor, latents, cond, None, config)
            trainer.step(), trainer.step()
            return {n: d.detach().clone() for n, d in trainer.delta.delta.items()}

    reference = two_steps(host_model.load_for_training(m16, torch.float32))  # the weights loaded
    comfy.model_management.unload_all_models()
    loads = []
    real_load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, *a, **k: loads.append(models) or real_load(models, *a, **k))
    for module in unet.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    trained = two_steps(host_model.load_for_training(m16, torch.float32, weights_needed=anchor.file is None))
    assert not loads, "the training loaded ComfyUI's copy of the U-Net"
    assert max(float(d.abs().max()) for d in reference.values()) > 1e-5
    assert all(torch.equal(trained[n], d) for n, d in reference.items())
    on_gpu = host_model.TrainingMemory(torch.device("cuda"), 24e9, False, torch.float16, 10, 1)
    assert on_gpu.anchor_bytes(anchor) == 4 and on_gpu.anchor_bytes(host_anchor.Anchor(torch.float16, None, "", "")) == 2
