"""The prompt and the photos, encoded once per run: CLIP conditioning and VAE latents.

Works through ComfyUI's CLIP, VAE and MODEL objects it is given, never :mod:`trainer`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def encode_prompt(clip, prompt: str) -> tuple[Tensor, bool]:
    """The prompt's [1, 77, 768] embedding, and whether it had to be cut to 77 tokens."""
    tokens = clip.tokenize(prompt)
    cond = clip.encode_from_tokens(tokens)
    truncated = cond.shape[1] > 77
    return cond[:, :77].detach().float().cpu(), truncated


def encode_images(vae, model, images: Tensor, seed: int) -> Tensor:
    """VAE latents of an IMAGE batch [N,H,W,C] in the U-Net's scale (x0.18215 for SD1.5).

    Like the reference code, each latent is a sample of the VAE posterior, drawn once and
    cached (ComfyUI's encode returns the posterior mode): the shared VAE is switched to
    sampling only for this call, under a forked RNG seeded with the run's seed.
    """
    regularizer = getattr(vae.first_stage_model, "regularization", None)
    sampling = getattr(regularizer, "sample", None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if sampling is not None:
            regularizer.sample = True
        try:
            latents = vae.encode(images[..., :3])
        finally:
            if sampling is not None:
                regularizer.sample = sampling
    return model.model.process_latent_in(latents).detach().float().cpu()
