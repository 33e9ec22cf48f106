"""Within-class diversity of an image set, in pixel space and in a network's feature space.

All functions take tensors: features [N, D] (e.g. the teacher's "penultimate" vector),
images in [0, 1] with shape [N, C, H, W], and integer labels [N]. Per-class results are
tensors of length `num_classes` holding NaN for classes with too few images, so they line
up with the dataset's class list; the overall numbers ignore those NaNs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


# SSIM's constants (Wang et al. 2004, eq. 13 and section III.C): an 11x11 Gaussian window of
# sigma 1.5, C1 = (0.01 L)^2 and C2 = (0.03 L)^2 for data range L = 1.
_SSIM_SIGMA, _SSIM_RADIUS, _SSIM_C1, _SSIM_C2 = 1.5, 5, 0.01**2, 0.03**2


def _ssim_window(channels: int, device: torch.device) -> torch.Tensor:
    """The normalised 11x11 Gaussian window, one per channel: a depthwise conv weight [C, 1, 11, 11]."""
    offsets = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float32, device=device)
    g = torch.exp(-0.5 * (offsets / _SSIM_SIGMA) ** 2)
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, -1, -1).contiguous()


def _local_mean(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The Gaussian-weighted mean around every pixel, the image reflection-padded by the window's radius."""
    return F.conv2d(F.pad(x, (_SSIM_RADIUS,) * 4, mode="reflect"), window, groups=x.shape[1])


def mean_pairwise_ssim(images01: torch.Tensor, chunk: int = 256) -> float:
    """Mean SSIM over all unordered pairs of distinct images (seed 2, Figure 3; lower = more diverse).

    SSIM (Wang et al. 2004, eq. 13) with local statistics under a Gaussian window (sigma 1.5,
    11x11, the image reflection-padded by 5) and data range 1:
        SSIM(a, b) = mean over pixels and channels of
                     (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2)),
    the variances clamped at 0 against rounding; then the mean over pairs. This is torchmetrics'
    `structural_similarity_index_measure(a, b, data_range=1.0)` (the test checks it to 1e-5),
    written here so a run that computes no FID never imports torchmetrics (1.3 s, of which
    matplotlib, which the figures load anyway, is 0.4 s, in a 40 s main job) and so each image's
    local mean and variance are computed once, not once per pair. Images must be in [0, 1] and at
    least 6 pixels on a side (reflection padding by 5). NaN for fewer than two images.
    """
    n = images01.shape[0]
    if n < 2:
        return float("nan")
    x = images01.float()
    window = _ssim_window(x.shape[1], x.device)
    mu = _local_mean(x, window)
    var = (_local_mean(x * x, window) - mu * mu).clamp(min=0.0)
    i, j = _pairs(n)
    total = 0.0
    # Chunked: a class of 50 images has 1225 pairs, more at ImageNet resolution than fit at once.
    for start in range(0, len(i), chunk):
        a, b = i[start : start + chunk], j[start : start + chunk]
        mu_a, mu_b = mu[a], mu[b]  # gathered once: each index copies a chunk of maps
        cov = _local_mean(x[a] * x[b], window) - mu_a * mu_b
        luminance = (2 * mu_a * mu_b + _SSIM_C1) / (mu_a**2 + mu_b**2 + _SSIM_C1)
        structure = (2 * cov + _SSIM_C2) / (var[a] + var[b] + _SSIM_C2)
        total += float((luminance * structure).flatten(1).mean(1).sum())
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
