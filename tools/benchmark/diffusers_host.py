"""diffusers' SD1.5 -> the tensors and functions a training run needs, and sampled images back.

The benchmark's host, as ``nodes/host/`` is ComfyUI's: pure torch + diffusers (no
ComfyUI import, no :mod:`trainer` import), thin.  It gives the trainer what it takes from any
host: the U-Net's eps function, ``abar_t`` from the model's own scheduler, the photos' VAE
latents (posterior sampled once, times the VAE's scaling factor, 0.18215 for SD1.5), the
prompt's text embedding, and the layers that gradient checkpointing recomputes.

Everything is read from local files (``local_files_only=True``): a diffusers SD1.5 folder
(``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), or one checkpoint file (``.safetensors``, the original LDM layout)
with such a folder for its configuration.  A missing file is an error naming it, never a
download.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CHECKPOINT_SUFFIXES = (".safetensors",)
"""Not ``.ckpt``: a pickle, which this project never loads."""
MAX_TOKENS = 77
"""SD1.5's text context: CLIP's 77 positions, start and end tokens included."""


class ModelFilesError(FileNotFoundError):
    """A model path the runner cannot use: what is wrong and how to fix it."""


@dataclass
class DiffusersSD15:
    """SD1.5 as diffusers holds it, on one device, fp32 (the paper's precision)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device

    def eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The U-Net's noise prediction on ``x_t`` at integer timesteps ``t``."""
        return self.unet(x_t, t, encoder_hidden_states=cond).sample.float()

    def alphas_cumprod(self) -> Tensor:
        """``abar_t`` of the model's own training schedule (``DDPMScheduler``'s)."""
        return self.scheduler.alphas_cumprod.detach().double().cpu()

    def checkpoint_units(self) -> list[nn.Module]:
        """The U-Net's resnets, transformers, down- and up-samplers: each owns no parameter
        directly, so the trainer can recompute it in backward (gradient checkpointing)."""
        blocks = [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]
        return [layer for block in blocks for group in ("resnets", "attentions", "downsamplers", "upsamplers")
                for layer in (getattr(block, group, None) or ())]

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[Tensor, bool]:
        """The prompt's [1, 77, 768] embedding (CLIP's last hidden state, as SD1.5 samples with),
        and whether the prompt had to be cut to 77 tokens."""
        embeds, truncated = self.encode_prompts([prompt])
        return embeds, truncated[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, list[bool]]:
        """[N, 77, 768] embeddings of ``prompts``, and which of them were cut to 77 tokens."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
        full = self.tokenizer(list(prompts)).input_ids
        out = self.text_encoder(ids.to(self.device))[0].float()
        return out, [len(f) > MAX_TOKENS for f in full]

    @torch.no_grad()
    def encode_images(self, images: Tensor, seed: int) -> Tensor:
        """VAE latents of ``images`` ([N, H, W, 3] in [0, 1]) in the U-Net's scale: like the
        reference code, a sample of the posterior, drawn once (generator seeded with ``seed``)."""
        x = images[..., :3].permute(0, 3, 1, 2).to(self.device, torch.float32) * 2 - 1
        posterior = self.vae.encode(x).latent_dist
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(posterior.mean.shape, generator=g).to(self.device)
        return (posterior.mean + posterior.std * noise) * self.vae.config.scaling_factor

    def sampler(self, steps: int):
        """A ``StableDiffusionPipeline`` on these parts that samples with DDIM (eta 0) in
        ``steps`` steps, without a safety checker and without its own progress bar."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=DDIMScheduler.from_config(self.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, cfg: float, size: int,
                 weights: Callable[[], AbstractContextManager] = nullcontext, batch: int = 8) -> Tensor:
        """One image per ``(prompt, seed)`` pair: [N, size, size, 3] in [0, 1] on the CPU, sampled
        ``batch`` images at a time.

        The initial noise comes from ``seeds`` alone (a CPU generator per image), so the base
        and a personalized model see the same noise; ``weights`` is entered around the sampling
        (the trained delta's :meth:`trainer.delta.ParameterDelta.applied`)."""
        pipe = self.sampler(steps)
        shape = (4, size // 8, size // 8)
        uncond, _ = self.encode_prompts([""])
        images = []
        with weights():
            for i in range(0, len(prompts), batch):
                cond, _ = self.encode_prompts(prompts[i:i + batch])
                latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                                       for s in seeds[i:i + batch]])
                out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand_as(cond),
                           latents=latents.to(self.device), num_inference_steps=steps, guidance_scale=cfg,
                           height=size, width=size, output_type="pt").images
                images.append(out.permute(0, 2, 3, 1).float().cpu().clamp(0, 1))
        return torch.cat(images)


def load_sd15(path: str | Path, *, config: str | Path | None = None,
              device: str | torch.device = "cpu") -> DiffusersSD15:
    """SD1.5 from a diffusers folder, or from a single checkpoint file with ``config`` (a
    diffusers SD1.5 folder with at least the parts' config files and the tokenizer).  Offline."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFilesError(f"--model {path}: no such file or folder. Give a diffusers SD1.5 folder "
                              "(model_index.json, unet/, vae/, ...) or a .safetensors checkpoint with --config")
    device = torch.device(device)
    quiet_hf_logs()
    if path.is_dir():
        parts = _load_folder(path)
    elif path.suffix in CHECKPOINT_SUFFIXES:
        parts = _load_single_file(path, config)
    else:
        raise ModelFilesError(f"--model {path}: not a folder nor a .safetensors checkpoint (a .ckpt is a pickle, "
                              "which this project does not load: convert it to .safetensors)")
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(device, torch.float32).train(False).requires_grad_(False)
    return DiffusersSD15(**parts, device=device)


def quiet_hf_logs() -> None:
    """No per-load progress bars or advice about optional packages (``accelerate``) in the
    runner's output: its own bars say where it is."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _require_folder(folder: Path, what: str) -> None:
    missing = [p for p in ("model_index.json", *PARTS) if not (folder / p).exists()]
    if missing:
        raise ModelFilesError(f"{what} {folder} is not a diffusers SD1.5 folder: {', '.join(missing)} missing. "
                              "Save one with StableDiffusionPipeline.save_pretrained, or download "
                              "stable-diffusion-v1-5 beforehand (nothing is downloaded at run time)")


def _load_folder(folder: Path) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _require_folder(folder, "--model")
    kw = {"local_files_only": True, "torch_dtype": torch.float32}
    return {"unet": UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", **kw),
            "tokenizer": CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True),
            "scheduler": DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)}


def _load_single_file(path: Path, config: str | Path | None) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if config is None:
        raise ModelFilesError(f"--model {path}: a single checkpoint file needs --config, a local diffusers SD1.5 "
                              "folder to read the parts' configuration and tokenizer from")
    _require_folder(Path(config).expanduser(), "--config")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
            "scheduler": DDPMScheduler.from_pretrained(str(config), subfolder="scheduler", local_files_only=True)}
