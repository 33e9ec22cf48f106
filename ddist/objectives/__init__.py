"""Losses as small functions of tensors (and, where they must, a frozen model).

Recover objectives share one call signature (RecoverObjective), so the recover loop is written once:
    loss, parts = objective(images, labels, iteration, iterations); objective.close()
- bn_matching: SRe2L (CE + BatchNorm statistic matching)
- deda: DEDA (CE + per-class Gaussian alignment + covariance regulariser)
"""

from typing import Protocol

import torch

from ddist.objectives.bn_matching import SRe2LObjective, batch_moments, bn_statistic_loss
from ddist.objectives.deda import (
    REG_NORMALISATIONS,
    ClassMomentSums,
    DEDAObjective,
    DEDAWeights,
    class_moments,
    covariance_alignment,
    diversity_regulariser,
    mean_alignment,
)


class RecoverObjective(Protocol):
    """What the recover loop calls: the loss of one augmented batch at an iteration, with its parts
    (detached, for logging); close() removes the hooks it put on the teacher."""

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, iteration: int, iterations: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def close(self) -> None: ...


__all__ = [
    "REG_NORMALISATIONS",
    "ClassMomentSums",
    "DEDAObjective",
    "DEDAWeights",
    "RecoverObjective",
    "SRe2LObjective",
    "batch_moments",
    "bn_statistic_loss",
    "class_moments",
    "covariance_alignment",
    "diversity_regulariser",
    "mean_alignment",
]
