"""Locally stored CLIP and DINO encoders: image batches and prompts -> feature vectors.

Why our own loader: ComfyUI's ``CLIPVisionLoader`` knows CLIP L/H/G and DINOv2 large/giant
only, and an SD1.5 ``CLIP`` has no text projection, so neither gives the paper's CLIP-T (image
and text embeddings in one space) nor its DINO ViT-S/16.  Models are built with transformers,
offline only (nothing is downloaded), and cached per path and modification time.

Accepted layouts:

* a full CLIP model (text and vision towers and both projections) as a folder with
  ``config.json`` (``save_pretrained`` / the Hugging Face repo) or as one ``.safetensors`` file
  in the transformers key layout, whose architecture (B/32, B/16, L/14, ...) is read from the
  weights' shapes;
* a DINO (``model_type: vit``) or DINOv2 (``model_type: dinov2``) folder with ``config.json``.

Images are ComfyUI's IMAGE layout: a float tensor ``[N, H, W, 3]`` in [0, 1].
"""
from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Model, ViTModel
from transformers.utils import logging as hf_logging

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TOKENS = 77
BATCH = 16
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
EXPECTED = ("a full CLIP model (a folder with config.json, or one .safetensors file with text_model.*, "
            "vision_model.*, text_projection and visual_projection, e.g. openai/clip-vit-base-patch32's "
            "model.safetensors) or a DINO / DINOv2 ViT folder with config.json (e.g. facebook/dino-vits16)")
_VIT_SIZES = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H", 1536: "g"}


class EncoderError(ValueError):
    """A path that is not a usable evaluation encoder; the message says what was expected."""


@dataclass(eq=False)
class _Encoder:
    """Shared image path: resize the short side, centre crop, normalize, embed in batches."""

    file: str
    """The model's file or folder name (``clip-vit-base-patch32``)."""
    arch: str
    """What it is (``CLIP ViT-B/32``)."""
    model: torch.nn.Module
    device: torch.device
    crop: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def name(self) -> str:
        """How tables and notes name it: ``clip-vit-base-patch32 (CLIP ViT-B/32)``."""
        return f"{self.file} ({self.arch})"

    def pixels(self, images: Tensor) -> Tensor:
        """IMAGE ``[N, H, W, 3|4]`` in [0, 1] -> normalized ``[N, 3, crop, crop]`` (bicubic,
        antialiased: the Hugging Face processors' resize, up to interpolation details)."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4) or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise EncoderError(f"images: expected a non-empty IMAGE batch [N, H, W, 3] in [0, 1], got {shape}")
        x = images[..., :3].permute(0, 3, 1, 2).float().clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def to(self, device: str | torch.device) -> "_Encoder":
        """Move the model (a host keeps it on the CPU between uses and lends it the GPU while
        scoring, so it holds no VRAM while other models train or sample)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def embed_images(self, images: Tensor) -> Tensor:
        """``[N, H, W, 3]`` in [0, 1] -> float32 features ``[N, D]`` on the CPU (not normalized)."""
        px = self.pixels(images)
        with torch.inference_mode():
            out = [self._image_features(px[i:i + BATCH].to(self.device)).float().cpu() for i in range(0, len(px), BATCH)]
        return torch.cat(out)

    def _image_features(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(eq=False)
class ClipEncoder(_Encoder):
    """A full CLIP: image and text embeddings in the shared projected space (CLIP-I, CLIP-T)."""

    tokenizer: Any = None

    def _image_features(self, pixel_values: Tensor) -> Tensor:
        # visual_projection(pooler_output): the same across transformers 4.x and 5.x, whose
        # get_image_features changed its return type.
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)

    def embed_texts(self, prompts: list[str]) -> Tensor:
        """Prompts -> float32 features ``[N, D]`` (cut at 77 tokens, as CLIP was trained)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise EncoderError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
        limit = min(MAX_TOKENS, self.model.config.text_config.max_position_embeddings)
        out = []
        with torch.inference_mode():
            for i in range(0, len(prompts), BATCH):
                tok = self.tokenizer(list(prompts[i:i + BATCH]), padding=True, truncation=True, max_length=limit,
                                     return_tensors="pt")
                pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device)).pooler_output
                out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


@dataclass(eq=False)
class DinoEncoder(_Encoder):
    """A DINO / DINOv2 ViT: the class token of the last layer (the paper's DINO score)."""

    def _image_features(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


_CACHE: dict[tuple, _Encoder] = {}
_LOCK = threading.Lock()


def _stamp(path: Path) -> float:
    """Newest modification time of the file, or of the folder's top-level files."""
    if path.is_file():
        return path.stat().st_mtime
    return max([f.stat().st_mtime for f in path.iterdir() if f.is_file()] or [path.stat().st_mtime])


def load_encoder(path: str | Path, *, tokenizer_dir: str | Path | None = None,
                 device: str | torch.device = "cpu") -> ClipEncoder | DinoEncoder:
    """The encoder stored at ``path`` (see the module doc for the layouts), cached by resolved
    path + modification time + device, so a workflow re-run does not rebuild it.

    ``tokenizer_dir``: where CLIP's BPE files are when the model has none beside it (a single
    ``.safetensors`` file; ComfyUI ships them as ``comfy/sd1_tokenizer``).
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise EncoderError(f"{given}: no such file or folder; expected {EXPECTED}")
    resolved = given.resolve()
    dev = torch.device(device)
    key = (str(resolved), _stamp(resolved), str(dev), str(tokenizer_dir))
    with _LOCK:
        if key not in _CACHE:
            for old in [k for k in _CACHE if k[0] == key[0]]:
                del _CACHE[old]
            bars_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # one bar per load would flood a node's log
            try:
                _CACHE[key] = _load(resolved, tokenizer_dir, dev)
            finally:
                if bars_on:
                    hf_logging.enable_progress_bar()
        return _CACHE[key]


def _load(path: Path, tokenizer_dir: str | Path | None, device: torch.device) -> ClipEncoder | DinoEncoder:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise EncoderError(f"{path}: not a .safetensors file; expected {EXPECTED}")
        model, arch = _clip_from_single_file(path)
        return _clip_encoder(model, path, arch, _tokenizer(path.parent, tokenizer_dir, path), device)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EncoderError(f"{path}: folder without config.json; expected {EXPECTED}")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == "clip":
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        vision = model.config.vision_config
        arch = _vit_arch("CLIP", vision.hidden_size, vision.patch_size, vision.image_size)
        return _clip_encoder(model, path, arch, _tokenizer(path, tokenizer_dir, path), device)
    if model_type in ("vit", "dinov2"):
        return _dino_encoder(path, model_type, device)
    raise EncoderError(f"{path}: config.json has model_type {model_type!r} (a vision-only or other model); "
                       f"expected {EXPECTED}")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _tokenizer(beside: Path, tokenizer_dir: str | Path | None, model_path: Path) -> CLIPTokenizer:
    """CLIP's tokenizer from the folder ``beside`` the model, else from ``tokenizer_dir``."""
    source = next((d for d in (beside, Path(tokenizer_dir) if tokenizer_dir else None) if d and _has_tokenizer(d)), None)
    if source is None:
        raise EncoderError(f"{model_path}: no CLIP tokenizer files (vocab.json + merges.txt) beside the model "
                           f"and none in tokenizer_dir={tokenizer_dir!r}; copy them next to the model")
    return CLIPTokenizer.from_pretrained(source, local_files_only=True)


def _vit_arch(family: str, hidden: int, patch: int, image_size: int, usual: int = 224) -> str:
    """``CLIP ViT-B/32``, ``DINO ViT-S/16``; a size no released model has is spelled out."""
    if hidden not in _VIT_SIZES:
        return f"{family} ViT (hidden {hidden}, patch {patch}, {image_size} px)"
    return f"{family} ViT-{_VIT_SIZES[hidden]}/{patch}" + ("" if image_size == usual else f" {image_size} px")


def _clip_encoder(model: CLIPModel, path: Path, arch: str, tokenizer: CLIPTokenizer,
                  device: torch.device) -> ClipEncoder:
    size = model.config.vision_config.image_size
    return ClipEncoder(file=_stem(path), arch=arch, model=model.float().eval().to(device), device=device,
                       crop=size, resize=size, mean=CLIP_MEAN, std=CLIP_STD, tokenizer=tokenizer)


def _dino_encoder(path: Path, model_type: str, device: torch.device) -> DinoEncoder:
    if model_type == "vit":  # DINO v1 is a plain ViT; it has no pooling layer
        model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        crop, family = model.config.image_size, "DINO"
    else:  # DINOv2's config says 518 px; its processor evaluates at 224
        model = Dinov2Model.from_pretrained(path, local_files_only=True)
        crop, family = 224, "DINOv2"
    arch = _vit_arch(family, model.config.hidden_size, model.config.patch_size, crop)
    return DinoEncoder(file=_stem(path), arch=arch,
                       model=model.float().eval().to(device), device=device, crop=crop,
                       resize=round(crop * 256 / 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _stem(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _layers(keys: list[str], tower: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _clip_from_single_file(path: Path) -> tuple[CLIPModel, str]:
    """A CLIPModel from one safetensors file; every size is read from the weights' shapes
    (heads: 64 channels each, as in every OpenAI CLIP)."""
    sd = load_file(str(path))
    keys = sorted(sd)
    required = ("text_model.embeddings.token_embedding.weight", "vision_model.embeddings.patch_embedding.weight",
                "text_projection.weight", "visual_projection.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        what = ("a vision-only CLIP (no text tower: CLIP-T impossible)" if "vision_model.embeddings.patch_embedding.weight" in sd
                else "not a CLIP model in the transformers layout")
        raise EncoderError(f"{path}: {what}; missing {', '.join(missing)}; expected {EXPECTED}")
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    v_hidden, t_hidden = patch.shape[0], sd["text_model.embeddings.token_embedding.weight"].shape[1]
    n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    image_size = patch.shape[-1] * math.isqrt(n_pos - 1)
    config = CLIPConfig(
        text_config=dict(vocab_size=sd["text_model.embeddings.token_embedding.weight"].shape[0], hidden_size=t_hidden,
                         intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                         num_hidden_layers=_layers(keys, "text_model"), num_attention_heads=max(1, t_hidden // 64),
                         max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        vision_config=dict(hidden_size=v_hidden, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                           num_hidden_layers=_layers(keys, "vision_model"), num_attention_heads=max(1, v_hidden // 64),
                           image_size=image_size, patch_size=patch.shape[-1]),
        projection_dim=sd["visual_projection.weight"].shape[0])
    model = CLIPModel(config)
    result = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    absent = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if absent or result.unexpected_keys:
        raise EncoderError(f"{path}: weights do not fit the CLIP inferred from their shapes "
                           f"(missing {absent[:5]}, unexpected {result.unexpected_keys[:5]}); expected {EXPECTED}")
    return model, _vit_arch("CLIP", v_hidden, patch.shape[-1], image_size)
