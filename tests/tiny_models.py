"""Small real models for the trainer's tests: a conv + cross-attention eps-predictor."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyEpsNet(nn.Module):
    """Conv in, time embedding, cross-attention to a text-like condition, conv out."""

    def __init__(self, channels: int = 4, width: int = 16, cond_dim: int = 12, steps: int = 1000) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Embedding(steps, width)
        self.block = nn.Sequential(nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(cond_dim, width, bias=False)
        self.to_v = nn.Linear(cond_dim, width, bias=False)
        self.to_out = nn.Linear(width, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        h = self.conv_in(x) + self.time(t)[:, :, None, None]
        h = h + self.block(h)
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        attn = nn.functional.scaled_dot_product_attention(self.to_q(tokens), self.to_k(cond), self.to_v(cond))
        tokens = tokens + self.to_out(attn)
        return self.conv_out(tokens.transpose(1, 2).reshape(b, c, hh, ww))


def make_problem(seed: int = 0, images: int = 3):
    """A model and cached data: latents [N,4,8,8] and one shared condition [1,5,12]."""
    torch.manual_seed(seed)
    model = TinyEpsNet()
    latents = torch.randn(images, 4, 8, 8)
    cond = torch.randn(1, 5, 12)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    return model, latents, cond, abar
