#!/usr/bin/env python3
"""Write a small random-weight checkpoint that ComfyUI's CheckpointLoaderSimple loads.

    python tools/make_tiny_checkpoint.py --out .comfyui/models/tiny_sd15.safetensors
    python tools/make_tiny_checkpoint.py --out .comfyui/models/tiny_sdxl.safetensors --arch sdxl

The module shapes come from ComfyUI's own classes (ComfyUI root from tools/setup_comfyui.py):

* sd15: a one-level U-Net (model_channels=320, context_dim=768; ComfyUI detects it as ``SD15``),
  the real SD1.5 VAE shapes and a full 12-layer CLIP-L (ComfyUI's CLIP config is fixed at 12
  layers and a missing layer would be left *uninitialised* memory, so fewer layers would not be
  deterministic or finite). Random weights with a fixed seed, scaled so every sampler step stays
  finite. Stored fp16 (about 460 MB).
* sd15-full / sd15-full-fp16: the full-size stand-in for ``v1-5-pruned-emaonly.safetensors``
  (fp32, 4.3 GB) and its fp16 variant (2.1 GB): the real SD1.5 U-Net (859.5M parameters), VAE
  and 12-layer CLIP-L text model, plus the file's noise-schedule buffers and CLIP's
  ``position_ids``, random weights.  For tests and benchmarks of the real size; never committed.
* sdxl: a U-Net that matches ComfyUI's ``SDXL`` config exactly (transformer_depth
  [0,0,2,2,10,10], context_dim 2048, adm_in_channels 2816, linear proj) at channel_mult (1,1,1),
  the SD VAE, and CLIP-L + CLIP-G text encoders with real widths but one layer each. It is for
  "not an SD1.5 model" checks: it loads (with "clip missing" warnings) but is not meant to sample.

After writing, the file is loaded with ``comfy.sd.load_checkpoint_guess_config`` and the detected
model config / model class are printed (``--no-verify`` skips that).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_comfyui import use_comfy_in_process  # noqa: E402

SEED = 20240615

# Layers that the reference implementations zero-initialise (residual branch outputs): keep them
# small but non-zero so gradients reach every layer in training tests.
_RESIDUAL_OUT = (
    "out_layers.3.", "proj_out.", "to_out.0.", "ff.net.2.", "mlp.fc2.", "out_proj.",
)

SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=(1,),
    num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=1,
    transformer_depth_output=[1, 1], num_head_channels=64, context_dim=768,
    use_spatial_transformer=True, legacy=False,
)

SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 1, 1),
    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=1,
    transformer_depth_output=[0] * 9, num_head_channels=64, context_dim=2048,
    use_spatial_transformer=True, legacy=False, use_linear_in_transformer=True,
    num_classes="sequential", adm_in_channels=2816,
)

SD_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
          'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [],
          'dropout': 0.0}


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _unet_shapes(cfg: dict) -> dict:
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return _shapes(UNetModel(**cfg, dtype=torch.float32, device="cpu",
                             operations=comfy.ops.disable_weight_init))


def _vae_shapes() -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL
    return _shapes(AutoencoderKL(ddconfig=SD_VAE, embed_dim=4))


def _clip_shapes(config_name: str, layers: int) -> dict:
    import torch
    import comfy.clip_model
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    with open(Path(comfy.clip_model.__file__).parent / config_name) as f:
        config = json.load(f)
    config["num_hidden_layers"] = layers
    return _shapes(CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init))


def _init(name: str, shape: tuple, gen):
    """Deterministic, variance-preserving random init (weights are fp32 here, fp16 on disk)."""
    import torch
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if len(shape) <= 1:
        if name.endswith("bias"):
            return torch.zeros(shape)
        return torch.ones(shape)  # norm scales
    if "token_embedding" in name or "position_embedding" in name:
        return torch.randn(shape, generator=gen) * (0.02 if "token" in name else 0.01)
    fan_in = math.prod(shape[1:])
    gain = 0.3 if any(p in name for p in _RESIDUAL_OUT) else 1.0
    return torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))


# The real file's non-model tensors: ldm's DDPM schedule buffers (1000 steps, fp32 in both
# variants) that ComfyUI does not read, and CLIP's position ids.
SCHEDULE_KEYS = ("alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "posterior_variance", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")


def _schedule() -> dict:
    import torch
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    post_var = betas * (1 - a_prev) / (1 - a)
    values = {"alphas_cumprod": a, "alphas_cumprod_prev": a_prev, "betas": betas,
              "log_one_minus_alphas_cumprod": (1 - a).log(),
              "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
              "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
              "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a),
              "posterior_variance": post_var, "sqrt_alphas_cumprod": a.sqrt(),
              "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(), "sqrt_recip_alphas_cumprod": (1 / a).sqrt(),
              "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt()}
    return {k: values[k].float() for k in SCHEDULE_KEYS}


def build_state_dict(arch: str) -> dict:
    _import_comfy_cpu()
    import torch
    parts = []  # (prefix, shapes)
    if arch.startswith("sd15-full"):
        from bench_models import SD15_FULL
        parts.append(("model.diffusion_model.", _unet_shapes(SD15_FULL)))
        parts.append(("first_stage_model.", _vae_shapes()))
        clip = _clip_shapes("sd1_clip_config.json", 12)
        clip.pop("text_projection.weight", None)  # SD1.5 files store the text model only
        parts.append(("cond_stage_model.transformer.", clip))
    elif arch == "sd15":
        parts.append(("model.diffusion_model.", _unet_shapes(SD15_UNET)))
        parts.append(("first_stage_model.", _vae_shapes()))
        parts.append(("cond_stage_model.transformer.", _clip_shapes("sd1_clip_config.json", 12)))
    elif arch == "sdxl":
        parts.append(("model.diffusion_model.", _unet_shapes(SDXL_UNET)))
        parts.append(("first_stage_model.", _vae_shapes()))
        clip_l = _clip_shapes("sd1_clip_config.json", 1)
        clip_l.pop("text_projection.weight", None)  # SDXL checkpoints do not store it for CLIP-L
        parts.append(("conditioner.embedders.0.transformer.", clip_l))
        parts.append(("conditioner.embedders.1.model.transformer.",
                      _clip_shapes("clip_config_bigg.json", 1)))
    else:
        raise ValueError(f"unknown arch {arch!r}")

    gen = torch.Generator().manual_seed(SEED)
    dtype = torch.float32 if arch == "sd15-full" else torch.float16
    sd = {}
    for prefix, shapes in parts:
        for key in sorted(shapes):
            full = prefix + key
            t = _init(full, shapes[key], gen)
            sd[full] = t if t.dtype == torch.int64 else t.to(dtype).contiguous()
    if arch.startswith("sd15-full"):
        sd.update(_schedule())
    return sd


def write_checkpoint(out: Path, arch: str = "sd15") -> Path:
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict(arch)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "tiny_test_checkpoint": arch, "seed": str(SEED)})
    os.replace(tmp, out)
    return out


def _import_comfy_cpu():
    use_comfy_in_process(cpu=True)
    # ComfyUI warns at import about optional packages (torchaudio) a checkpoint writer never
    # uses; in `make demo`'s output they would read as errors.
    logging.disable(logging.WARNING)
    try:
        import comfy.sd  # noqa: F401
    finally:
        logging.disable(logging.NOTSET)
    return comfy


def verify(path: Path, sample: bool = False, partial_clip: bool = False) -> str:
    """Load with ComfyUI and return the detected model-config class name.

    ``partial_clip``: the file holds one text-encoder layer on purpose (the tiny SDXL, only
    detected, never sampled), so ComfyUI's list of the missing ones is not printed."""
    comfy = _import_comfy_cpu()
    import torch
    if partial_clip:
        logging.disable(logging.WARNING)
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    finally:
        logging.disable(logging.NOTSET)
    cfg_name = type(model.model.model_config).__name__
    print(f"{path}: model_config={cfg_name} model={type(model.model).__name__} "
          f"clip={type(clip.cond_stage_model).__name__ if clip else None} "
          f"vae={type(vae.first_stage_model).__name__ if vae else None}")
    if sample:
        import comfy.sample
        import comfy.samplers
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        assert torch.isfinite(cond[0][0]).all(), "non-finite CLIP output"
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        steps = []
        out = comfy.sample.sample(model, noise, 4, 7.0, "euler", "normal", cond, neg, latent,
                                  callback=lambda i, x0, x, total: steps.append(
                                      bool(torch.isfinite(x).all() and torch.isfinite(x0).all())),
                                  disable_pbar=True, seed=0)
        img = vae.decode(out)
        ok = all(steps) and bool(torch.isfinite(out).all()) and bool(torch.isfinite(img).all())
        print(f"  sample check: steps_finite={steps} latent_std={out.std().item():.3f} "
              f"image_range=({img.min().item():.3f}, {img.max().item():.3f}) ok={ok}")
        if not ok:
            raise SystemExit("tiny checkpoint produced non-finite values")
    return cfg_name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--arch", choices=["sd15", "sd15-full", "sd15-full-fp16", "sdxl"], default="sd15")
    ap.add_argument("--no-verify", action="store_true", help="skip loading it back with ComfyUI")
    ap.add_argument("--sample", action="store_true",
                    help="also run a 4-step euler sample + VAE decode and check it is finite (sd15)")
    args = ap.parse_args(argv)
    _import_comfy_cpu()
    path = write_checkpoint(args.out, args.arch)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, arch={args.arch})")
    if not args.no_verify:
        name = verify(path, sample=args.sample and args.arch == "sd15", partial_clip=args.arch == "sdxl")
        expected = "SDXL" if args.arch == "sdxl" else "SD15"
        if name != expected:
            raise SystemExit(f"expected ComfyUI to detect {expected}, got {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
