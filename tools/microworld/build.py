#!/usr/bin/env python3
"""Assemble the micro-world checkpoint (SD1.5 layout) from the committed U-Net and VAE weights
and the regenerated text encoder, in under a minute.

    python tools/microworld/build.py --out .comfyui/models/microworld_sd15.safetensors

Keys: ``model.diffusion_model.*`` (the one-level U-Net ComfyUI detects as SD15),
``first_stage_model.taesd_encoder.* / taesd_decoder.* / vae_scale / vae_shift`` (ComfyUI's
``VAE`` builds a TAESD from these; 8x downscale, 4 channels) and
``cond_stage_model.transformer.*`` (SD1.5's CLIP-L text model, ``text_encoder.py``).
The text encoder's digest is checked against the one recorded at pretraining time
(``weights/manifest.json``): a mismatch means the U-Net would read other weights than it
learned to read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from setup_comfyui import use_comfy_in_process

WEIGHTS = HERE / "weights"
UNET = WEIGHTS / "unet.safetensors"
VAE = WEIGHTS / "vae.safetensors"
MANIFEST = WEIGHTS / "manifest.json"
EVAL_CLIP = WEIGHTS / "microworld-clip"   # the evaluation CLIP (train_eval_clip.py), without tokenizer files
SUBJECT_DIR = HERE.parent.parent / "tests" / "data" / "microworld_subject"
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


def sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict(unet: Path = UNET, vae: Path = VAE, check: bool = True) -> dict:
    """The checkpoint's tensors.  ``check``: the weight files and the regenerated text encoder
    must match the digests recorded in ``weights/manifest.json`` (a Git LFS pointer, a
    truncated file or a changed generator is refused, naming the file)."""
    use_comfy_in_process(cpu=True)
    from safetensors.torch import load_file

    from microworld import text_encoder
    clip = text_encoder.state_dict()
    if check:
        recorded = json.loads(MANIFEST.read_text())
        for path in (unet, vae):
            want = recorded["sha256"].get(path.name)
            if want and sha256(path) != want:
                raise SystemExit(f"{path}: sha256 differs from {MANIFEST.name}'s; restore it (git checkout {path})")
        if text_encoder.digest(clip) != recorded["text_encoder_sha256"]:
            raise SystemExit(f"the regenerated text encoder differs from the one {unet.name} was trained with "
                             f"({MANIFEST.name}); tools/microworld/text_encoder.py changed")
    sd = {UNET_PREFIX + k: v for k, v in load_file(str(unet)).items()}
    sd.update({VAE_PREFIX + k: v for k, v in load_file(str(vae)).items()})
    sd.update(clip)
    return sd


def record(unet: Path = UNET, vae: Path = VAE) -> dict:
    """Record the weight files' and the text encoder's digests in ``weights/manifest.json``
    (after training new weights; the manifest's other entries, e.g. how they were made, stay)."""
    use_comfy_in_process(cpu=True)
    from microworld import text_encoder
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    manifest["sha256"] = {p.name: sha256(p) for p in (unet, vae)}
    manifest["text_encoder_sha256"] = text_encoder.digest(text_encoder.state_dict())
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write(out: Path, unet: Path = UNET, vae: Path = VAE, check: bool = True) -> Path:
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state_dict(unet, vae, check), str(tmp), metadata={"format": "pt", "microworld": "sd15"})
    os.replace(tmp, out)
    return out


def install_eval_clip(eval_dir: Path) -> Path:
    """Copy the evaluation CLIP into ComfyUI's ``models/eval/microworld-clip`` with CLIP's BPE
    files from ComfyUI's ``comfy/sd1_tokenizer`` (the layout ``LipschitzEvalModelLoader`` loads)."""
    import shutil

    from setup_comfyui import comfyui_root
    target = Path(eval_dir) / EVAL_CLIP.name
    target.mkdir(parents=True, exist_ok=True)
    for f in [*EVAL_CLIP.iterdir(), *(comfyui_root() / "comfy" / "sd1_tokenizer").iterdir()]:
        shutil.copy(f, target / f.name)
    return target


def write_subject(folder: Path = SUBJECT_DIR) -> list[Path]:
    """The subject's photos (``world.subject_items``) as PNG files."""
    import numpy as np
    from PIL import Image

    from microworld import world
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, item in enumerate(world.subject_items()):
        path = folder / f"sks_square_{i}.png"
        Image.fromarray((world.render(item) * 255).round().astype(np.uint8)).save(path)
        out.append(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--unet", type=Path, default=UNET)
    ap.add_argument("--vae", type=Path, default=VAE)
    ap.add_argument("--eval-dir", type=Path, help="also install the evaluation CLIP into this models/eval folder")
    ap.add_argument("--record", action="store_true", help="first record the weights' digests in manifest.json")
    ap.add_argument("--subject", action="store_true", help=f"(re)write the subject photos into {SUBJECT_DIR.name}/")
    args = ap.parse_args(argv)
    if args.record:
        record(args.unet, args.vae)
    path = write(args.out, args.unet, args.vae)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.eval_dir:
        print(f"wrote {install_eval_clip(args.eval_dir)}")
    if args.subject:
        for p in write_subject():
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
