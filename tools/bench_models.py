"""Models and trainers for the benchmarks (``tools/bench.py``, ``tools/bench_gpu.py``).

The U-Net is ComfyUI's own ``UNetModel`` - the module the node trains - with random, seeded
weights: either the real SD1.5 configuration (859.5M parameters, the real cost) or the small
SD15-detected one of ``tools/make_tiny_checkpoint.py`` (25.8M, for CPU runs).  No download.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(REPO_ROOT), str(REPO_ROOT / "tools")):  # tools.* and the scripts beside this one
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pack_import import add_to_sys_path  # noqa: E402
from setup_comfyui import use_comfy_in_process  # noqa: E402

add_to_sys_path()  # the pack as lipschitz_personalize

# comfy/model_detection.py's reading of the SD1.5 checkpoint + supported_models.SD15's extras.
SD15_FULL = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
    num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, num_head_channels=-1,
    context_dim=768, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
    adm_in_channels=None,
)
# tools/make_tiny_checkpoint.py's SD15_UNET as ComfyUI loads it: one level, detected as SD15.
# The head layout is not in the weights: ComfyUI gives every SD15-detected U-Net
# supported_models.SD15.unet_extra_config (8 heads, num_head_channels=-1), so the node trains
# that model and the bare loop must too (tests/test_harness.py checks it). Until 2026-11-23 this
# said 5 heads of 64: the bare loop's attention was ~1.6x cheaper than the node's, which made
# most of the node_overhead figure measured then.
SD15_TINY = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=(1,),
    num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=1,
    transformer_depth_output=[1, 1], num_heads=8, num_head_channels=-1, context_dim=768,
    use_spatial_transformer=True, legacy=False,
)


def comfy_ready(cpu: bool) -> None:
    """Make ComfyUI importable in this process (``cpu``: never probe CUDA)."""
    use_comfy_in_process(cpu=cpu)


def make_unet(tiny: bool, device: str | torch.device = "cpu", seed: int = 0, init: bool = True,
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """ComfyUI's SD1.5 ``UNetModel`` (full or tiny config), seeded random weights stored in
    ``dtype`` (built in it: no fp32 copy first), ``init=False``: uninitialized, for a caller
    that loads weights."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**(SD15_TINY if tiny else SD15_FULL), dtype=dtype, device=device,
                     operations=comfy.ops.disable_weight_init)
    if not init:
        return unet.requires_grad_(False).train()
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                std = 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return unet.requires_grad_(False).train()


def checkpoint_units(unet: nn.Module) -> list[nn.Module]:
    """Same units as ``nodes/host/model.checkpoint_units`` (the node's checkpointing)."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    return [layer for block in blocks for layer in block if not any(True for _ in layer.parameters(recurse=False))]


def sd_abar() -> Tensor:
    """SD1.5's scaled-linear schedule (1000 steps, 0.00085..0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def make_data(latent: int, device: str | torch.device, images: int = 4, seed: int = 1):
    from lipschitz_personalize.trainer.loop import CachedExamples

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(images, 4, latent, latent, generator=g).to(device)
    cond = torch.randn(1, 77, 768, generator=g).to(device)
    return CachedExamples(x0, cond, batch_size=1)


def eps_fn(unet: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The U-Net's eps with PyTorch's attention whatever ComfyUI chose, as the node trains
    (``nodes/host/attention.py``)."""
    from comfy.ldm.modules.attention import attention_pytorch

    options = {"optimized_attention_override": lambda func, *args, **kwargs: attention_pytorch(*args, **kwargs)}

    def run(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return unet(x, t.float(), context=c, transformer_options=options).float()
    return run


def make_trainer(unet: nn.Module, latent: int, *, lam: float = 500.0, checkpointing: bool = True,
                 steps: int = 1000, lr: float = 2e-6, **options: Any):
    """A :class:`trainer.loop.RegularizedTrainer` on ``unet`` with the given
    :class:`~trainer.config.TrainConfig` options."""
    from lipschitz_personalize.trainer.config import TrainConfig
    from lipschitz_personalize.trainer.delta import ParameterDelta
    from lipschitz_personalize.trainer.loop import RegularizedTrainer

    device = next(unet.parameters()).device
    delta = ParameterDelta(unet)
    config = TrainConfig(steps=steps, lr=lr, lam=lam, **options)
    return RegularizedTrainer(eps_fn(unet), delta, sd_abar(), make_data(latent, device), config,
                              checkpoint=checkpoint_units(unet) if checkpointing else ())


def mode_trainer(unet: nn.Module, mode: str, latent: int, **overrides: Any):
    """A :class:`trainer.loop.RegularizedTrainer` on ``unet`` (its weights are the anchor, in
    the dtype the caller stored them) in memory mode ``mode`` of :mod:`trainer.memory`, with
    gradient checkpointing, lambda 500, lr 2e-6 and ``overrides`` of the mode's options."""
    import dataclasses

    from lipschitz_personalize.trainer.config import TrainConfig
    from lipschitz_personalize.trainer.delta import ParameterDelta
    from lipschitz_personalize.trainer.loop import RegularizedTrainer
    from lipschitz_personalize.trainer.memory import configure

    config = dataclasses.replace(configure(TrainConfig(steps=1000, lr=2e-6, lam=500.0), mode), **overrides)
    device = next(unet.parameters()).device
    delta = ParameterDelta(unet, dtype=config.delta_torch_dtype)
    return RegularizedTrainer(eps_fn(unet), delta, sd_abar(), make_data(latent, device), config,
                              checkpoint=checkpoint_units(unet))


class ReferenceTrainer:
    """The reference code's layout: the U-Net itself trainable, a frozen fp32 copy as
    ``theta0``, ``loss = L_denoise + lambda * sum_i F.mse_loss(theta_i, theta0_i)`` through
    autograd, ``torch.optim.Adam``.  Same draws as :class:`RegularizedTrainer`."""

    def __init__(self, unet: nn.Module, latent: int, lam: float = 500.0, lr: float = 2e-6,
                 checkpointing: bool = True, seed: int = 2025) -> None:
        from lipschitz_personalize.trainer.objective import denoise_loss, paper_regularizer
        from lipschitz_personalize.trainer.loop import q_sample

        self.unet = unet.requires_grad_(True)
        self.frozen = [p.detach().clone() for p in unet.parameters()]
        self.params = list(unet.parameters())
        self.opt = torch.optim.Adam(self.params, lr=lr, weight_decay=0.0)
        self.data = make_data(latent, self.params[0].device)
        self.abar = sd_abar()
        self.g = torch.Generator().manual_seed(seed)
        self.lam = lam
        self.units = checkpoint_units(unet) if checkpointing else []
        self._reg, self._denoise, self._q = paper_regularizer, denoise_loss, q_sample

    def step(self) -> float:
        import torch.utils.checkpoint as cp

        x0, cond = self.data.sample(self.g)
        t = torch.randint(1000, (1,), generator=self.g)
        eps = torch.randn(x0.shape, generator=self.g).to(x0.device)
        x_t = self._q(x0, self.abar[t], eps)
        originals = {}
        for m in self.units:
            originals[m] = m.forward
            m.forward = (lambda f: (lambda *a, **k: cp.checkpoint(f, *a, use_reentrant=False, **k)))(m.forward)
        try:
            self.opt.zero_grad(set_to_none=True)
            loss = self._denoise(eps_fn(self.unet)(x_t, t.to(x0.device), cond), eps)
            loss = loss + self.lam * self._reg(self.params, self.frozen)
            loss.backward()
            self.opt.step()
        finally:
            for m in self.units:
                m.__dict__.pop("forward", None)
        return float(loss)


def copy_unet(unet: nn.Module) -> nn.Module:
    return copy.deepcopy(unet)
