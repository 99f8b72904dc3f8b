"""Reference photos -> an IMAGE batch at the training resolution.

Shared by ``LipschitzLoadReferenceImages`` (files on disk) and ``LipschitzPersonalize``
(any IMAGE batch, e.g. from stock ``LoadImage``), so both resize the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ..errors import NodeInputError

CropMode = Literal["center", "stretch", "pad"]
CROP_MODES: tuple[str, ...] = ("center", "stretch", "pad")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_PIXELS = 80_000_000  # refuse decompression bombs before decoding (a 8900x8900 photo is fine)


def resolve_folder(input_dir: str, folder: str) -> Path:
    """``folder`` as a directory inside ``input_dir``; anything escaping it is refused.

    ``..``, absolute paths and symlinks that lead outside are all caught by comparing real
    paths, so a graph cannot make the server read arbitrary directories.
    """
    if not folder or not folder.strip():
        raise NodeInputError("folder", "no folder given", "Name a sub-folder of ComfyUI's input directory holding 3-6 photos")
    root = Path(os.path.realpath(input_dir))
    if os.path.isabs(folder):
        raise NodeInputError("folder", f"{folder!r} is an absolute path", "Give a folder relative to ComfyUI's input directory")
    target = Path(os.path.realpath(root / folder))
    if target != root and root not in target.parents:
        raise NodeInputError("folder", f"{folder!r} points outside ComfyUI's input directory",
                             "Copy the photos into a sub-folder of the input directory and name that")
    if not target.is_dir():
        raise NodeInputError("folder", f"{folder!r} is not a folder in ComfyUI's input directory ({root})",
                             "Create it and put 3-6 photos (jpg, png or webp) in it")
    return target


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; RGBA (on white), grayscale, palette and 16-bit to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def fit(img: Image.Image, resolution: int, crop: CropMode) -> Image.Image:
    """Square ``resolution`` image: center crop, plain resize (the paper), or pad."""
    if crop == "stretch":
        return img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    if crop == "pad":
        return ImageOps.pad(img, (resolution, resolution), Image.Resampling.LANCZOS, color=(255, 255, 255))
    return ImageOps.fit(img, (resolution, resolution), Image.Resampling.LANCZOS)


def to_tensor(images: list[Image.Image]) -> Tensor:
    """PIL RGB images -> ComfyUI IMAGE [N, H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def load_folder(folder: Path, resolution: int, crop: CropMode) -> tuple[Tensor, list[str]]:
    """Every photo of ``folder`` at ``resolution``; a file that does not decode is named."""
    files = image_files(folder)
    if not files:
        raise NodeInputError("folder", f"{folder.name!r} holds no jpg/png/webp image",
                             "Put 3-6 photos of your subject in it")
    out = []
    for path in files:
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    img.draft("RGB", (resolution * 2, resolution * 2))
                    if img.width * img.height > MAX_PIXELS:
                        raise NodeInputError("folder", f"{path.name} is {img.width}x{img.height} pixels, too large to decode safely",
                                             "Downscale it below 80 megapixels")
                img.load()
                out.append(fit(to_rgb(img), resolution, crop))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            if isinstance(exc, NodeInputError):
                raise
            raise NodeInputError("folder", f"{path.name} is not a readable image ({exc})",
                                 "Remove or re-export that file") from exc
    return to_tensor(out), [p.name for p in files]


def to_pil(image: Tensor) -> Image.Image:
    """One ComfyUI IMAGE ``[H, W, C]`` in [0, 1] -> a PIL RGB image (alpha dropped, gray repeated)."""
    arr = (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(arr, "RGB")


def resize_batch(images: Tensor, resolution: int) -> Tensor:
    """An IMAGE batch (any size, e.g. from LoadImage) -> ``resolution`` squares, center crop."""
    if images.shape[1] == resolution and images.shape[2] == resolution:
        return images[..., :3]
    return to_tensor([fit(to_pil(img), resolution, "center") for img in images])
