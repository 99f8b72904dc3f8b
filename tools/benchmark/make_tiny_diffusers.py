"""Write a tiny random-weight SD1.5-layout diffusers model folder with diffusers' own ``save_pretrained``.

    python -m tools.benchmark.make_tiny_diffusers --out DIR

The folder is what ``StableDiffusionPipeline.from_pretrained`` reads (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), so the benchmark runner
loads it exactly as it loads a real SD1.5 folder.  Nothing is downloaded:

* ``unet``: the configuration ComfyUI derives for ``tools/make_tiny_checkpoint.py``'s tiny
  checkpoint (``tools/bench_models.py`` ``SD15_TINY``: one level of 320 channels, one resnet and
  one transformer per block, context 768, 8 heads as ComfyUI's SD15 config imposes) in
  diffusers' layout, so the same weights can be loaded on both sides (the cross-check).
* ``vae``: SD1.5's layout (4 levels, 8x down-sampling, 4 latent channels, scaling 0.18215) at 32
  channels a level.  ``text_encoder``: CLIP-L's width (768, which the U-Net's cross-attention
  needs) and vocabulary, 2 layers.  ``tokenizer``: ComfyUI's bundled ``comfy/sd1_tokenizer``
  files (CLIP-L's).  ``scheduler``: ``DDPMScheduler`` with SD1.5's scaled-linear betas.

Seeded: two runs write the same weights.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SEED = 20240615
UNET = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(320,), layers_per_block=1,
            cross_attention_dim=768, attention_head_dim=8, flip_sin_to_cos=True, freq_shift=0)
"""``attention_head_dim`` is diffusers' historical name for SD1.5's number of heads (8)."""
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=256, num_hidden_layers=2, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407, projection_dim=768)
SD_VAE = dict(VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
"""SD1.5's own VAE layout (the tiny ComfyUI checkpoint stores that one)."""
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, steps_offset=1, prediction_type="epsilon")


def tokenizer_dir() -> Path:
    """ComfyUI's bundled CLIP-L tokenizer files (``.comfyui/ComfyUI/comfy/sd1_tokenizer``, or
    ``$COMFYUI_PATH``'s), found without importing ComfyUI."""
    from tools.setup_comfyui import comfyui_root

    path = Path(comfyui_root(fetch=False)) / "comfy" / "sd1_tokenizer"
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"{path} has no CLIP tokenizer files: run `make comfyui` first")
    return path


def unet():
    """The tiny U-Net, uninitialised weights left to the caller (random here, converted in the cross-check)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET)


def write(out: Path, *, vae: dict = VAE, text: dict = TEXT, weights: bool = True) -> Path:
    """Write the model folder to ``out`` and return it; ``weights=False``: the configuration
    files and tokenizer only, which is what a single checkpoint file needs beside it
    (``--config``); ``vae``/``text``: the layouts (SD1.5's own for the tiny ComfyUI file)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .diffusers_host import quiet_hf_logs

    quiet_hf_logs()
    out = Path(out)
    torch.manual_seed(SEED)
    with torch.device("cpu" if weights else "meta"):
        models = {"unet": unet(), "vae": AutoencoderKL(**vae), "text_encoder": CLIPTextModel(CLIPTextConfig(**text))}
    parts = {**models, "scheduler": DDPMScheduler(**SCHEDULER),
             "tokenizer": CLIPTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True,
                                                        model_max_length=77)}
    for name, part in parts.items():
        if weights or name not in models:
            part.save_pretrained(str(out / name))
        elif name == "text_encoder":
            part.config.save_pretrained(str(out / name))
        else:
            part.save_config(str(out / name))
    library = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers", "text_encoder": "transformers",
               "tokenizer": "transformers"}
    classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDPMScheduler",
               "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer"}
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None],
             **{k: [library[k], classes[k]] for k in parts}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    print(f"wrote {write(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
