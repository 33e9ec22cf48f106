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

The DPP step dz_dpp = eta_dpp * grad_Z L_dpp can be resized before it is taken (`size_step`,
diffusion.sample.cgs.step_norm): none (as above), noise_std (times sqrt(1 - abar_t)) or cap
(||dz_dpp^(i)|| <= max_step * ||z^(i)|| per latent). reading: the seed gives one raw step; its size
depends on the kernel and on t by orders of magnitude (scripts/measure_cgs_step.py), so the
sampler may rescale it. Only the DPP step is resized: the DM step already shrinks the class-mean
gap by the fixed factor 1 - 2 mu_dm / (N D) whatever t is, and does not depend on the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class StepSize:
    """How guidance_step sizes its DPP step (size_step): norm none | noise_std | cap, and cap's max_step."""

    norm: str = "none"
    max_step: float = math.inf


def size_step(step: torch.Tensor, z: torch.Tensor, norm: str, abar_t: float, max_step: float) -> torch.Tensor:
    """The DPP step `step` [N, ...] of the latents z [N, ...] at noise level abar_t, resized by `norm`.

    none:      the step itself (the seed's raw step).
    noise_std: the step times sqrt(1 - abar_t), the std of the noise the latents z still carry.
               reading: the marginal noise std rather than the scheduler step's own sigma_t, which is
               0 for DDIM at eta 0 (guidance would vanish) and differs between schedulers; it is 0
               after the last step (abar = 1), so clean latents are not moved by this norm.
    cap:       each latent's step shortened, direction kept, to at most max_step * ||z^(i)||.
    """
    if norm == "none":
        return step
    if norm == "noise_std":
        return (1.0 - abar_t) ** 0.5 * step
    if norm == "cap":
        limit = max_step * z.flatten(1).norm(dim=1)
        length = step.flatten(1).norm(dim=1)
        scale = torch.where(length > limit, limit / length.clamp(min=torch.finfo(step.dtype).tiny), 1.0)
        return step * scale.view(-1, *([1] * (step.ndim - 1)))
    raise ValueError(f"unknown step norm {norm!r}: none, noise_std or cap")


@dataclass(frozen=True)
class CgsTerms:
    """The two guidance losses of one class at one step, as raw_steps and guidance_step take them.

    eta_dpp, mu_dm: the weights of L_dpp and L_dm; mu_real0: the class's real mean latent;
    abar_t: the noise level of the latents (1 after the last step); eps: L_dpp's ridge;
    embed: the differentiable map from z to the vectors the DPP kernel compares (e.g.
    clean_estimate, or a classifier's features of it); None: z itself. The gradient flows
    through it to z.
    """

    eta_dpp: float
    mu_dm: float
    mu_real0: torch.Tensor
    abar_t: float
    eps: float
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None


def raw_steps(z: torch.Tensor, terms: CgsTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """The two raw guidance steps (eta_dpp * grad_Z L_dpp, mu_dm * grad_Z L_dm) of a whole class.

    z: the class's latents [N, ...] just produced by the scheduler step, at noise level terms.abar_t.
    """
    eta_dpp, embed = terms.eta_dpp, terms.embed
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        dpp_grad = torch.zeros_like(z)
        if eta_dpp:  # (no kernel pass, e.g. no decode for the teacher kernel, when the DPP term is off)
            (dpp_grad,) = torch.autograd.grad(eta_dpp * dpp_loss(z if embed is None else embed(z), terms.eps), z)
        (dm_grad,) = torch.autograd.grad(terms.mu_dm * dm_loss(z, terms.mu_real0, terms.abar_t), z)
    return dpp_grad.detach(), dm_grad.detach()


def guidance_step(z: torch.Tensor, terms: CgsTerms, step: StepSize = StepSize()) -> torch.Tensor:
    """One CGS correction Z - (size_step(eta_dpp * grad_Z L_dpp) + mu_dm * grad_Z L_dm) of a whole class.

    z, terms: as raw_steps; step: how the DPP step is sized (size_step).
    Returns the corrected latents (detached).
    """
    dpp, dm = raw_steps(z, terms)
    return (z.detach() - size_step(dpp, z, step.norm, terms.abar_t, step.max_step) - dm).detach()
