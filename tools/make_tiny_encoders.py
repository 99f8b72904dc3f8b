"""Write tiny random-weight evaluation encoders, for tests and the demo (no downloads).

    python tools/make_tiny_encoders.py --out DIR [--names-of-real-models]

writes, with transformers' own ``save_pretrained`` (the layout of the real Hugging Face repos):

* ``DIR/tiny-clip/``: a CLIPModel (config.json, model.safetensors) with the CLIP BPE tokenizer
  files copied from ComfyUI's ``comfy/sd1_tokenizer``;
* ``DIR/tiny-clip.safetensors``: the same weights as one file (no config, no tokenizer);
* ``DIR/tiny-dino/``: a ViTModel without pooling layer (DINO's layout).

``--names-of-real-models`` also links them under the names the bundled workflows' loaders
use (``clip-vit-base-patch32``, ``dino-vits16``), so a workflow finds a stand-in where the
real model would be.  The encoders' reported names keep ``tiny-`` (the links are resolved),
so every table they make says it came from a tiny random stand-in.

Deterministic (seed 0), each under 5 MB (the text tower's 49408-token embedding dominates), a
few seconds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_comfyui import comfyui_root  # noqa: E402

VOCAB = 49408  # the CLIP BPE tokenizer's size: token ids index the embedding
REAL_NAMES = {"tiny-clip": "clip-vit-base-patch32", "tiny-dino": "dino-vits16"}


def tiny_clip() -> CLIPModel:
    """Text hidden 12, vision hidden 64 on 32 px in 8 px patches, 2 layers each, projection 32.
    Heads are one per 64 channels (at least one), which is what the single-file loader infers."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=12, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=8),
        projection_dim=32)
    return CLIPModel(config).eval()


def tiny_dino() -> ViTModel:
    torch.manual_seed(1)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    return ViTModel(config, add_pooling_layer=False).eval()


def write(out: Path, real_names: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    clip = tiny_clip()
    clip.save_pretrained(out / "tiny-clip")
    tokenizer = comfyui_root() / "comfy" / "sd1_tokenizer"
    for f in tokenizer.iterdir():
        shutil.copy(f, out / "tiny-clip" / f.name)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / "tiny-clip.safetensors"))
    tiny_dino().save_pretrained(out / "tiny-dino")
    written = [out / "tiny-clip", out / "tiny-clip.safetensors", out / "tiny-dino"]
    if real_names:
        for tiny, real in REAL_NAMES.items():
            link = out / real
            if link.is_symlink() or not link.exists():
                link.unlink(missing_ok=True)
                os.symlink(tiny, link)
                written.append(link)
    return written


def ensure(out: Path) -> Path:
    """``out`` holding the tiny encoders and their real-model names (written once: ``make
    tiny-encoders`` puts them in ``.comfyui/models/eval``)."""
    names = ["tiny-clip", "tiny-clip.safetensors", "tiny-dino", *REAL_NAMES.values()]
    if not all((out / n).exists() for n in names):
        write(out, real_names=True)
    return out


def stand_in(eval_dir: Path, source: Path) -> list[str]:
    """Link the tiny encoders from ``source`` into a ComfyUI's ``models/eval`` under the real
    models' names where those are missing (never over a real model); returns the names linked."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    linked = []
    targets = {"tiny-clip.safetensors": "tiny-clip.safetensors", **{t: t for t in REAL_NAMES},
               **{real: tiny for tiny, real in REAL_NAMES.items()}}
    for name, target in targets.items():
        link = eval_dir / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to((source / target).resolve())
            linked.append(name)
    return linked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--names-of-real-models", action="store_true",
                        help="also link them as clip-vit-base-patch32 and dino-vits16 (never over a real folder)")
    args = parser.parse_args(argv)
    for path in write(args.out, args.names_of_real_models):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
