"""The quantities every diffusion fine-tuning objective shares: the one-step clean-sample
estimate x0_hat and the plain denoising loss, on which `rsm` and `minimax` build.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(abar_t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """abar_t as a tensor shaped [B, 1, ..., 1] (or a scalar tensor) broadcasting over `like`."""
    abar = torch.as_tensor(abar_t, dtype=like.dtype, device=like.device)
    if abar.ndim == 0:
        return abar
    return abar.reshape(-1, *([1] * (like.ndim - 1)))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor | float) -> torch.Tensor:
    """One-step estimate of the clean sample from a noise prediction.

    DDPM's forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    (Ho et al. 2020, eq. 4) solved for x0:

        x0_hat = (x_t - sqrt(1 - abar_t) * eps_theta) / sqrt(abar_t)

    `abar_t` is the cumulative product of alphas at each sample's timestep:
    a scalar or a tensor [B].
    """
    abar = _per_sample(abar_t, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def denoising_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The `plain` objective, L_simple of Ho et al. 2020 (eq. 14).

    L_plain = ||eps - eps_theta(x_t, t, y)||^2, averaged over batch and dimensions.
    """
    return F.mse_loss(eps_pred, eps)
