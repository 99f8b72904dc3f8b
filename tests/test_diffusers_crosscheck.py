"""The benchmark's diffusers host against ComfyUI's, on the same weights.

The tiny SD1.5 checkpoint ComfyUI loads (``.comfyui/models/tiny_sd15.safetensors``, LDM layout)
is converted to diffusers' layout twice: with ComfyUI's own key map (``comfy.utils.
unet_to_diffusers``) into :data:`tools.benchmark.make_tiny_diffusers.UNET`, and by diffusers'
single-file loader (``--model file --config folder``, the runner's own path).  Same input, same
timestep, same context: both hosts must give the same eps, text embedding and latents, the
trainer's noising must be diffusers' ``add_noise``, and five training steps must give the same
delta through ``nodes/host/run.py``'s trainer as through the runner's.
"""
from __future__ import annotations

import pytest
import torch

from tools.benchmark import make_tiny_diffusers
from tools.benchmark.diffusers_host import DiffusersSD15, ModelFilesError, load_sd15
from tools.benchmark.train import make_trainer
from lipschitz_personalize.trainer.config import TrainConfig
from lipschitz_personalize.trainer.loop import q_sample

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("comfy_in_process")  # the pack's ComfyUI side in this process


@pytest.fixture(scope="module")
def comfy_model(tiny_ckpt):
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt))
    return model, clip, vae


@pytest.fixture(scope="module")
def unet_map(comfy_model):
    """diffusers key -> ComfyUI (LDM) key, as ComfyUI maps them for this model's config."""
    import comfy.utils

    return comfy.utils.unet_to_diffusers(comfy_model[0].model.model_config.unet_config)


@pytest.fixture(scope="module")
def single_file(tiny_ckpt, tmp_path_factory):
    """The runner's single-file route: the tiny checkpoint with a folder of configuration files."""
    config = make_tiny_diffusers.write(tmp_path_factory.mktemp("sd15_config"), vae=make_tiny_diffusers.SD_VAE,
                                       text=_comfy_clip_config(), weights=False)
    return load_sd15(tiny_ckpt, config=config)


@pytest.fixture(scope="module")
def mapped(comfy_model, unet_map, single_file):
    """The diffusers U-Net filled through ComfyUI's key map (the other parts: the single-file load)."""
    ldm = comfy_model[0].model.diffusion_model.state_dict()
    unet = make_tiny_diffusers.unet()
    names = unet.state_dict()
    unmapped = [k for k in names if unet_map.get(k) not in ldm]
    assert not unmapped, f"diffusers tensors without a ComfyUI counterpart: {unmapped[:5]}"
    unet.load_state_dict({k: ldm[unet_map[k]] for k in names})
    return DiffusersSD15(unet.eval().requires_grad_(False), single_file.vae, single_file.text_encoder,
                         single_file.tokenizer, single_file.scheduler, torch.device("cpu"))


def _comfy_clip_config() -> dict:
    import json
    from pathlib import Path

    import comfy.clip_model

    with open(Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json") as f:
        config = json.load(f)
    keep = set(make_tiny_diffusers.TEXT) | {"layer_norm_eps"}
    return {k: v for k, v in config.items() if k in keep}


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("route", ["comfy key map", "single file"])
def test_both_hosts_predict_the_same_eps(comfy_model, mapped, single_file, route):
    from lipschitz_personalize.nodes.host import model as host_model
    loaded = host_model.load_for_training(comfy_model[0], torch.float32)
    ours = mapped if route == "comfy key map" else single_file
    x, context = _inputs()
    for t in (0, 37, 500, 999):
        ts = torch.tensor([t, t])
        with torch.no_grad():
            theirs, mine = loaded.eps(x, ts, context), ours.eps(x, ts, context)
        assert theirs.abs().max() > 0.01  # a real prediction, not a zero map
        assert (mine - theirs).abs().max() <= TOL, f"t={t}: max |diff| {(mine - theirs).abs().max():.2e}"


def test_the_noise_schedule_and_noising_are_diffusers(comfy_model, mapped):
    """``q_sample`` with either host's ``abar_t`` is ``DDPMScheduler.add_noise``."""
    from lipschitz_personalize.nodes.host import model as host_model
    comfy_abar = host_model.alphas_cumprod(comfy_model[0])
    ours = mapped.alphas_cumprod()
    assert ours.shape == comfy_abar.shape == (1000,)
    assert (ours - comfy_abar).abs().max() <= 1e-6
    x0, eps = _inputs(1)[0], _inputs(2)[0]
    for t in (0, 1, 250, 999):
        ts = torch.tensor([t, 999 - t])
        reference = mapped.scheduler.add_noise(x0, eps, ts)
        for abar in (ours, comfy_abar):
            assert (q_sample(x0, abar[ts], eps) - reference).abs().max() <= TOL


def test_both_hosts_encode_prompts_and_photos_alike(comfy_model, single_file):
    from lipschitz_personalize.nodes.host import encode as host_encode
    model, clip, vae = comfy_model
    prompt = "a photo of sks dog on the beach"
    theirs, _ = host_encode.encode_prompt(clip, prompt)
    mine, truncated = single_file.encode_prompt(prompt)
    assert not truncated and mine.shape == theirs.shape == (1, 77, 768)
    assert _max_rel(mine, theirs) <= TOL
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    # The posterior's mean (ComfyUI's encode, sampling off) is the same; each host then draws
    # its own noise from its seed, so the latents are compared through the mean.
    mean = single_file.vae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * 0.18215
    assert _max_rel(mean, model.model.process_latent_in(vae.encode(images))) <= 1e-4
    latents = single_file.encode_images(images, seed=7)
    assert latents.shape == (2, 4, 8, 8)
    assert torch.equal(latents, single_file.encode_images(images, seed=7))  # drawn once per seed


def test_five_training_steps_give_the_same_delta_through_both_hosts(comfy_model, mapped, unet_map):
    """The paper's settings (lr 2e-6, lambda 500, seed 2025).  The first step's gradient, the
    whole forward and backward through each host, agrees to 1e-5 relative (measured: 7e-7).
    Adam then divides each gradient by its own magnitude, so an entry whose true gradient is
    at float32 noise level may step the other way: after five steps the deltas agree to 1e-5
    absolute (about 5e-7 measured) and to 1e-4 in relative L2 norm (4e-5 measured)."""
    from lipschitz_personalize.nodes.host import anchor as host_anchor
    from lipschitz_personalize.nodes.host import model as host_model
    from lipschitz_personalize.nodes.host import run
    latents, cond = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4)), _inputs(5)[1][:1]
    settings = dict(steps=5, lam=500.0, seed=2025, resolution=64)
    loaded = host_model.load_for_training(comfy_model[0], torch.float32)
    anchor = host_anchor.Anchor(torch.float32, None, "", "the model")

    def flat(theirs: dict, mine: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mine = {unet_map[k]: v for k, v in mine.items()}
        assert mine.keys() == theirs.keys()
        return tuple(torch.cat([d[k].detach().reshape(-1) for k in sorted(theirs)]) for d in (mine, theirs))

    with torch.inference_mode(False):
        comfy_trainer = run._trainer(loaded, anchor, latents, cond, None, TrainConfig(**settings))
        ours = make_trainer(mapped, latents, cond, TrainConfig(**settings))
        comfy_trainer.step(), ours.step()
        grad_mine, grad_theirs = flat({k: d.grad for k, d in comfy_trainer.delta.delta.items()},
                                      {k: d.grad for k, d in ours.delta.delta.items()})
        assert (grad_mine - grad_theirs).norm() <= TOL * grad_theirs.norm()
        for _ in range(4):
            comfy_trainer.step(), ours.step()
    mine, theirs = flat(comfy_trainer.delta.state_dict(), ours.delta.state_dict())
    assert theirs.abs().max() > 5e-6  # five steps of 2e-6 moved the weights
    assert (mine - theirs).abs().max() <= TOL
    assert (mine - theirs).norm() <= 1e-4 * theirs.norm()


def test_a_missing_model_is_a_clear_error_not_a_download(tmp_path, tiny_ckpt):
    with pytest.raises(ModelFilesError, match="no such file"):
        load_sd15(tmp_path / "v1-5")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelFilesError, match="unet, vae, text_encoder, tokenizer, scheduler missing"):
        load_sd15(tmp_path / "half")
    with pytest.raises(ModelFilesError, match="needs --config"):
        load_sd15(tiny_ckpt)
    (tmp_path / "v1-5.ckpt").write_bytes(b"")
    with pytest.raises(ModelFilesError, match="a .ckpt is a pickle"):
        load_sd15(tmp_path / "v1-5.ckpt", config=tmp_path / "half")
