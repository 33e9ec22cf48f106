"""Metrics of a distilled set: pure functions of tensors (features, images in [0,1], labels).

diversity  class-prototype cosine distance, within-class SSIM and feature similarity
spectrum   normalised singular values, effective rank, decay slope
covariance per-class covariance figures: mean diagonal, off-diagonal norm, smallest
           eigenvalue and condition number over the spanned spectrum
fid        Frechet distance (teacher features: fd_teacher; InceptionV3: fid)
robust     DD-Ranking's HLR, IOR, LRS and ARS from accuracies
"""

from ddist.metrics.covariance import class_covariance_figures, covariance_figures
from ddist.metrics.diversity import (
    class_centres,
    mean_pairwise_cosine,
    mean_pairwise_ssim,
    prototype_cosine_distance,
    within_class_cosine,
    within_class_ssim,
)
from ddist.metrics.fid import frechet_distance, frechet_distance_features, inception_fid
from ddist.metrics.robust import (
    augmentation_robust_score,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    robust_scores,
)
from ddist.metrics.spectrum import decay_slope, effective_rank, spectrum_summary

__all__ = [
    "augmentation_robust_score",
    "class_centres",
    "class_covariance_figures",
    "covariance_figures",
    "decay_slope",
    "effective_rank",
    "frechet_distance",
    "frechet_distance_features",
    "hard_label_recovery",
    "improvement_over_random",
    "inception_fid",
    "label_robust_score",
    "mean_pairwise_cosine",
    "mean_pairwise_ssim",
    "prototype_cosine_distance",
    "robust_scores",
    "spectrum_summary",
    "within_class_cosine",
    "within_class_ssim",
]
