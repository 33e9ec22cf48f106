"""Within-class diversity of an image set, in pixel space and in a network's feature space.

All functions take tensors: features [N, D] (e.g. the teacher's "penultimate" vector),
images in [0, 1] with shape [N, C, H, W], and integer labels [N]. Per-class results are
tensors of length `num_classes` holding NaN for classes with too few images, so they line
up with the dataset's class list; the overall numbers ignore those NaNs.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure


def class_centres(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature vector of each class, [num_classes, D] (NaN rows for absent classes)."""
    feats = feats.float()
    centres = torch.full((num_classes, feats.shape[1]), float("nan"), dtype=feats.dtype, device=feats.device)
    for c in labels.unique().tolist():
        centres[c] = feats[labels == c].mean(0)
    return centres


def prototype_cosine_distance(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, centres: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Class-prototype cosine distance (DEDA supplementary, Figure 5).

    For image i of class c with features f_i and class centre mu_c,
        d_i = 1 - cos(f_i, mu_c).
    Returns (per-class mean of d_i [num_classes], mean of d_i over all images). By default
    mu_c is the centre of the set's own class-c features, so the number says how far the
    set spreads around its prototype: 0 when every image of a class has the same features
    (the collapse DEDA counters), larger for a more diverse set. Pass `centres` (e.g. the
    real data's class centres) to measure the distance to another prototype instead.
    """
    if centres is None:
        centres = class_centres(feats, labels, num_classes)
    dist = 1.0 - F.cosine_similarity(feats.float(), centres[labels].to(feats.device).float(), dim=1)
    per_class = torch.full((num_classes,), float("nan"))
    for c in labels.unique().tolist():
        per_class[c] = dist[labels == c].mean().cpu()
    return per_class, float(dist.mean())


def _pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j) with i < j."""
    i, j = torch.triu_indices(n, n, offset=1)
    return i, j


def mean_pairwise_ssim(images01: torch.Tensor, chunk: int = 256) -> float:
    """Mean SSIM over all unordered pairs of distinct images (seed 2, Figure 3; lower = more diverse).

    SSIM is torchmetrics' Gaussian-window SSIM (sigma 1.5, 11x11 window, K1 = 0.01,
    K2 = 0.03, reflection padding) with data_range 1, averaged over pixels and channels,
    then over pairs. Images must be in [0, 1] and at least 6 pixels on a side (the window
    is reflection-padded by 5). NaN for fewer than two images.
    """
    n = images01.shape[0]
    if n < 2:
        return float("nan")
    i, j = _pairs(n)
    total = 0.0
    # Chunked: a class of 50 images has 1225 pairs, more at ImageNet resolution than fit at once.
    for start in range(0, len(i), chunk):
        a, b = images01[i[start : start + chunk]].float(), images01[j[start : start + chunk]].float()
        # a tensor: the (full-image, contrast-sensitivity) tuple forms are opt-in
        ssim = cast(torch.Tensor, structural_similarity_index_measure(a, b, data_range=1.0, reduction="none"))
        total += float(ssim.sum())
    return total / len(i)


def mean_pairwise_cosine(feats: torch.Tensor) -> float:
    """Mean cosine similarity over all unordered pairs of distinct rows; NaN for fewer than two."""
    n = feats.shape[0]
    if n < 2:
        return float("nan")
    unit = F.normalize(feats.float(), dim=1)
    sims = unit @ unit.T
    i, j = _pairs(n)
    return float(sims[i, j].mean())


def per_class(fn, x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Apply a set-level metric `fn` to each class; returns (per-class [num_classes], mean over classes).

    The overall value averages classes (not pairs), so every class weighs the same whatever
    its size; classes where `fn` is NaN (fewer than two images) are left out.
    """
    values = torch.full((num_classes,), float("nan"))
    for c in labels.unique().tolist():
        values[c] = fn(x[labels == c])
    valid = values[~values.isnan()]
    return values, float(valid.mean()) if len(valid) else float("nan")


def within_class_ssim(images01: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Mean pairwise SSIM within each class and its mean over classes."""
    return per_class(mean_pairwise_ssim, images01, labels, num_classes)


def within_class_cosine(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Mean pairwise feature cosine similarity within each class and its mean over classes."""
    return per_class(mean_pairwise_cosine, feats, labels, num_classes)
