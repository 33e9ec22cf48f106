"""Denoising losses and the semantic-sparsity objective of RSM (the seed method).

All diffusion fine-tuning objectives share the noise-prediction loss and the
one-step clean-sample estimate x0_hat defined here; `minimax` and `cgs` import
`predict_x0` from this module.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F

from ddist.config import RsmReduction


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


# How l1_sparsity reduces a sample's |x0_hat| entries (see its docstring).
REDUCTIONS: tuple[str, ...] = get_args(RsmReduction)  # diffusion.finetune.rsm.reduction's choices


def l1_sparsity(x0_hat: torch.Tensor, reduction: str) -> torch.Tensor:
    """Semantic-sparsity term of RSM: the L1 norm of the predicted clean latent, averaged over the batch.

        sum:  (1/B) sum_b ||x0_hat_b||_1          (the seed's "L1 penalty on z0_hat", per sample)
        mean: (1/B) sum_b ||x0_hat_b||_1 / D      (= the mean absolute value of all elements)

    D is a sample's number of dimensions (4x32x32 = 4096 for DiT-256 latents,
    1x16x16 = 256 for digits pixels), so `sum` weighs the penalty D times more
    than `mean` at the same lambda. reading: the seed does not say which
    reduction its lambda (3e-3 to 1e-2, Table 1) goes with; both are offered.
    """
    if reduction == "mean":
        return x0_hat.abs().mean()
    if reduction == "sum":
        return x0_hat.abs().flatten(1).sum(dim=1).mean()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def rsm_loss(
    eps_pred: torch.Tensor, eps: torch.Tensor, x0_hat: torch.Tensor, lam: float, reduction: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RSM fine-tuning loss: L = L_plain + lambda * l1_sparsity(x0_hat, reduction).

    x0_hat must be `predict_x0(x_t, eps_pred, abar_t)` (not detached: the
    sparsity gradient flows into eps_theta). Returns (loss, parts) where parts
    holds the two terms unweighted, for logging.
    """
    plain = denoising_loss(eps_pred, eps)
    sparsity = l1_sparsity(x0_hat, reduction)
    return plain + lam * sparsity, {"plain": plain.detach(), "sparsity": sparsity.detach()}
