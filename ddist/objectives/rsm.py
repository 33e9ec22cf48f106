"""The semantic-sparsity objective of RSM (the seed method): the plain denoising loss plus an
L1 penalty on the one-step clean-sample estimate x0_hat (both in ddist/objectives/diffusion.py).
"""

from __future__ import annotations

import torch

from ddist.objectives.diffusion import denoising_loss

# How l1_sparsity reduces a sample's |x0_hat| entries (see its docstring): diffusion.finetune.rsm.reduction's
# choices, as ddist/methods/rsm.py's RsmReduction lists them (tests/test_schemas.py checks they agree).
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


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
