"""Class-wise guided synchronous sampling (CGS, the seed method): the guidance
losses applied to the N = IPC latents of one class while they are denoised
together.

After each scheduler step the class's latents Z = [z^(1); ...; z^(N)] move
against the gradient of two losses:

    Z_{t-1} <- Z_{t-1} - (eta_dpp * grad_Z L_dpp + mu_dm * grad_Z L_dm)

    L_dpp = -log det(K + eps I),  K_ij = cos(phi(z^(i)), phi(z^(j)))  (diversity)
    L_dm  = || mean_i z_t^(i) - sqrt(abar_t) * mu_real,0^c ||^2          (distribution)

L_dpp is the negative log volume spanned by the class's "feature vectors in
kernel space" phi(z) (a determinantal point process likelihood with a cosine
kernel), so descending it spreads them apart. The sampler chooses phi: the
noisy latents themselves, their clean estimates x0_hat (`clean_estimate`), or
a frozen classifier's features of the decoded x0_hat. L_dm matches the class mean of the noisy latents with the
mean the forward process gives to real data, E[z_t] = sqrt(abar_t) * E[z_0].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def cosine_kernel(z: torch.Tensor) -> torch.Tensor:
    """K [N, N] with K_ij the cosine similarity of the flattened latents z[i] and z[j]."""
    u = F.normalize(z.flatten(1), dim=1)
    return u @ u.T


def dpp_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    """L_dpp = -log det(K + eps I) for the latents z [N, ...] of one class.

    eps keeps the determinant positive when two latents are nearly parallel
    (or N exceeds the latent dimension).
    """
    k = cosine_kernel(z)
    return -torch.logdet(k + eps * torch.eye(k.shape[0], dtype=k.dtype, device=k.device))


def dm_loss(z: torch.Tensor, mu_real0: torch.Tensor, abar_t: float) -> torch.Tensor:
    """L_dm = || mean_i z^(i) - sqrt(abar_t) * mu_real,0 ||^2, averaged over the D latent dimensions.

    Averaging over D (rather than summing) makes one guidance step shrink the
    mean gap by the factor 1 - 2 mu_dm / (N D): with the seed's Table 1 values
    (mu_dm 1e3-1e4, N = IPC 10-100, D = 4x32x32) that factor lies in (0, 1),
    whereas a sum over D would overshoot by orders of magnitude.
    """
    target = abar_t**0.5 * mu_real0.to(z)
    return F.mse_loss(z.mean(dim=0), target)


def clean_estimate(z: torch.Tensor, x0_hat: torch.Tensor, abar_t: float) -> torch.Tensor:
    """The scheduler step's clean estimate x0_hat, differentiable in the post-step latents z.

    Value: x0_hat exactly (the step's pred_original_sample, computed at the
    step's own t). Gradient: d/dz = 1 / sqrt(abar_t), abar_t being z's noise
    level, i.e. how the next step's estimate (z - sqrt(1 - abar_t) eps) /
    sqrt(abar_t) moves with z when eps is held fixed.
    reading: the seed does not say how the kernel's gradient reaches z_{t-1}.
    For DDIM (eta 0) this is exactly predict_x0(z, eps_t, abar_t); for DDPM the
    posterior step makes that formula miss x0_hat, so the value is taken from
    the step and only the Jacobian from the formula.
    """
    return x0_hat.detach() + (z - z.detach()) / abar_t**0.5


def guidance_step(
    z: torch.Tensor,
    *,
    eta_dpp: float,
    mu_dm: float,
    mu_real0: torch.Tensor,
    abar_t: float,
    eps: float,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One CGS correction Z - (eta_dpp * grad_Z L_dpp + mu_dm * grad_Z L_dm) of a whole class.

    z: the class's latents [N, ...] just produced by the scheduler step, at
       noise level abar_t (abar_t = 1 after the last step).
    embed: the differentiable map from z to the vectors the DPP kernel compares
       (e.g. clean_estimate, or a classifier's features of it); None: z itself.
       The gradient flows through it to z.
    Returns the corrected latents (detached).
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        kernel_input = z if embed is None else embed(z)
        loss = eta_dpp * dpp_loss(kernel_input, eps) + mu_dm * dm_loss(z, mu_real0, abar_t)
        (grad,) = torch.autograd.grad(loss, z)
    return (z - grad).detach()
