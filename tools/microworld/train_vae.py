#!/usr/bin/env python3
"""Train the micro-world's VAE: ComfyUI's TAESD layout (``taesd_encoder.*``/``taesd_decoder.*``,
8x downscale, 4 latent channels), which ``comfy.sd.VAE`` builds from a checkpoint's VAE keys.

    nice -n 5 .venv/bin/python tools/microworld/train_vae.py --steps 1200 --out tools/microworld/weights/vae.safetensors

Data: fresh world pictures every step (solid shapes and striped ones, half each), so the VAE
also represents the subject's stripes.  Loss: pixel MSE plus a small latent L2 (keeps the latent
inside TAESD's clamp); latent noise during training makes nearby latents decode to nearby
pictures (a smoother space for the U-Net).  ``vae_scale``/``vae_shift`` are then set so that
the latents the U-Net sees (``0.18215 * (enc / scale + shift)``, ComfyUI's SD1.5 latent format)
have mean 0 and standard deviation 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setup_comfyui import use_comfy_in_process

from microworld import world

SD15_SCALE = 0.18215


def make_taesd():
    use_comfy_in_process(cpu=True)
    from comfy.taesd import taesd
    return taesd.TAESD(latent_channels=4)


def batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    items = world.base_items(rng, n // 2)
    rng.shuffle(items)
    items += world.patterned_items(rng, n - len(items))
    return torch.from_numpy(world.render_batch(items)).permute(0, 3, 1, 2)  # [N,3,H,W] in [0,1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=32, help="train on random crops of this size (px, multiple of 8)")
    ap.add_argument("--init", type=Path, help="start from these VAE weights instead of a fresh initialisation")
    ap.add_argument("--decoder-only", action="store_true", help="train the decoder of --init only: "
                                                                 "the latent space (encoder, scale, shift) stays fixed")
    ap.add_argument("--latent-noise", type=float, default=0.02,
                    help="std of the noise added to latents before decoding, in latent units (a smoother "
                         "space for the U-Net; too much and the decoder averages colours away)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = make_taesd()
    for m in model.modules():  # comfy's disable_weight_init skips init: give convs torch's default
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
    enc, dec = model.taesd_encoder, model.taesd_decoder
    params = list(dec.parameters())
    if args.init:
        from safetensors.torch import load_file
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
    if args.decoder_only:
        enc.requires_grad_(False)
    else:
        params += list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = crop(batch(rng, args.batch), rng, args.crop)
        if args.decoder_only:
            with torch.no_grad():
                z = enc(x)
        else:
            z = enc(x)
        z_noisy = z + args.latent_noise * torch.randn_like(z)
        y = dec(z_noisy)
        rec = torch.mean((y - x) ** 2)
        loss = rec + 1e-3 * torch.mean(z ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 5 == 0 or step == 1:
            print(f"step {step} rec {rec.item():.5f} zstd {z.std().item():.3f} {time.time() - t0:.0f}s", flush=True)
        if step % 25 == 0 or step == args.steps:
            save(model, args.out, keep_latent_space=bool(args.decoder_only))
    return 0


def crop(x: torch.Tensor, rng: np.random.Generator, size: int) -> torch.Tensor:
    """One random crop per picture, on the 8 px latent grid (TAESD is convolutional: what it
    learns on crops holds on whole pictures, at a quarter of the cost)."""
    if size >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - size) // 8 + 1
    out = []
    for img in x:
        top, left = (int(v) * 8 for v in rng.integers(cells, size=2))
        out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


@torch.no_grad()
def save(model, out: Path, keep_latent_space: bool) -> None:
    from safetensors.torch import save_file
    if not keep_latent_space:
        z = model.taesd_encoder(batch(np.random.default_rng(12345), 64))
        scale = SD15_SCALE * z.std().item()   # 0.18215 * (z / scale + shift) ~ N(0, 1)
        model.vae_scale.fill_(scale)
        model.vae_shift.fill_(-z.mean().item() / scale)
    scale, shift = model.vae_scale.item(), model.vae_shift.item()
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    sd["vae_scale"] = model.vae_scale.detach().float().reshape(())
    sd["vae_shift"] = model.vae_shift.detach().float().reshape(())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp))
    tmp.replace(out)
    print(f"saved {out} scale {scale:.4f} shift {shift:.4f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
