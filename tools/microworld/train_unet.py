#!/usr/bin/env python3
"""Pretrain the micro-world's U-Net (the smallest layout ComfyUI detects as SD15, 15.9M parameters) on the
world's pictures, as SD1.5 was trained: eps-prediction on ComfyUI's SD1.5 discrete schedule
(scaled-linear betas 0.00085..0.012, 1000 steps), text conditioning from the checkpoint's own
text encoder, 10% empty captions (classifier-free guidance) and 10% class-only captions
("a photo of a square": DreamBooth's class prompt has a meaning).

    nice -n 5 .venv/bin/python tools/microworld/train_unet.py --steps 900 \\
        --out tools/microworld/weights/unet.safetensors

The conditioning and latents are computed through ComfyUI itself (the assembled checkpoint's
CLIP and TAESD VAE, ``comfy.sd.load_checkpoint_guess_config``), so the U-Net learns what a
ComfyUI graph will feed it.  AdamW, constant lr after a short warm-up, EMA of the weights (the
EMA is what is saved, fp16, every 50 steps).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from make_tiny_checkpoint import _init

from microworld import build, world

# The smallest U-Net ComfyUI detects as SD15 (15.9M parameters): one level with one res block
# and one transformer (the only cross-attention), a middle of one res block, two plain output
# res blocks.  model_channels=320 and context_dim=768 are what the detection pins.
MICRO_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=(1,),
    num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=-1,
    transformer_depth_output=[0, 0], num_head_channels=64, context_dim=768,
    use_spatial_transformer=True, legacy=False,
)

P_EMPTY, P_CLASS = 0.1, 0.1


def sd15_alphas_cumprod() -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscrete for SD1.5 (scaled_linear, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def new_unet() -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**MICRO_UNET, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(0)
    unet.load_state_dict({k: _init("model.diffusion_model." + k, tuple(v.shape), gen).float()
                          for k, v in unet.state_dict().items()})
    return unet


def comfy_parts(unet: torch.nn.Module, vae: Path):
    """(clip, vae) as ComfyUI loads them from a checkpoint holding these weights."""
    import comfy.sd
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        u = Path(tmp) / "unet.safetensors"
        save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, str(u))
        ckpt = build.write(Path(tmp) / "ckpt.safetensors", unet=u, vae=vae, check=False)
        _, clip, vae_obj, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
    return clip, vae_obj


def encode_prompts(clip, prompts: list[str]) -> torch.Tensor:
    return torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(p))[0][0] for p in prompts]).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.98)
    ap.add_argument("--pictures", type=int, default=1536, help="pictures in the training set (12 concepts, cycled)")
    ap.add_argument("--vae", type=Path, default=build.VAE)
    ap.add_argument("--init", type=Path, help="continue from these U-Net weights (e.g. the committed ones) "
                                              "instead of a fresh initialisation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    build.use_comfy_in_process(cpu=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    unet = new_unet()
    if args.init:
        from safetensors.torch import load_file
        unet.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
    clip, vae = comfy_parts(unet, args.vae)
    items = world.base_items(rng, args.pictures)
    with torch.no_grad():
        pixels = torch.from_numpy(world.render_batch(items))
        latents = torch.cat([vae.encode(pixels[i:i + 64]) for i in range(0, len(pixels), 64)]).float() * 0.18215
    prompts = [world.concept_prompt(c, s) for c, s in world.CONCEPTS] + [f"a photo of a {s}" for s in world.SHAPES] + [""]
    conds = encode_prompts(clip, prompts)
    concept = torch.tensor([i % len(world.CONCEPTS) for i in range(len(items))])
    shape_cls = torch.tensor([len(world.CONCEPTS) + world.SHAPES.index(world.CONCEPTS[c][1]) for c in concept.tolist()])
    empty = len(prompts) - 1
    print(f"set-up {time.time() - t0:.0f}s: {len(items)} pictures, latents std {latents.std():.3f} "
          f"mean {latents.mean():.3f}", flush=True)

    abar = sd15_alphas_cumprod()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    warm = 20
    t0 = time.time()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / warm)
        idx = torch.randint(len(items), (args.batch,))
        x0 = latents[idx]
        which = concept[idx].clone()
        u = torch.rand(args.batch)
        which[u < P_EMPTY + P_CLASS] = shape_cls[idx][u < P_EMPTY + P_CLASS]
        which[u < P_EMPTY] = empty
        t = torch.randint(0, 1000, (args.batch,))
        a = abar[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, timesteps=t.float(), context=conds[which])
        loss = torch.mean((pred - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(d).add_(p, alpha=1 - d)
        if step % 10 == 0 or step == 1:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if step % 20 == 0 or step == args.steps:
            save(ema, args.out, step, args)
    return 0


def save(model: torch.nn.Module, out: Path, step: int, args) -> None:
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"step": str(step), "args": json.dumps({k: str(v) for k, v in vars(args).items()})})
    tmp.replace(out)
    print(f"saved {out} at step {step}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
