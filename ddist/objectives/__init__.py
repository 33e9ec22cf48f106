"""Losses as small functions of tensors (and, where they must, a frozen model).

Recover objectives share one call signature, so the recover loop is written once:
    loss, parts = objective(images, labels, iteration, iterations); objective.close()
- bn_matching: SRe2L (CE + BatchNorm statistic matching)
- deda: DEDA (CE + per-class Gaussian alignment + covariance regulariser)
"""

from ddist.objectives.bn_matching import SRe2LObjective, batch_moments, bn_statistic_loss
from ddist.objectives.deda import (
    REG_NORMALISATIONS,
    ClassMomentSums,
    DEDAObjective,
    class_moments,
    covariance_alignment,
    diversity_regulariser,
    mean_alignment,
)

__all__ = [
    "REG_NORMALISATIONS",
    "ClassMomentSums",
    "DEDAObjective",
    "SRe2LObjective",
    "batch_moments",
    "bn_statistic_loss",
    "class_moments",
    "covariance_alignment",
    "diversity_regulariser",
    "mean_alignment",
]
