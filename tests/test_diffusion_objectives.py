"""Diffusion losses: x0 prediction, RSM, MiniMax memories and criteria, CGS guidance (hand-computed values)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddist.objectives.cgs import (
    CgsTerms,
    StepSize,
    clean_estimate,
    cosine_kernel,
    dm_loss,
    dpp_loss,
    guidance_step,
    size_step,
)
from ddist.objectives.diffusion import denoising_loss, predict_x0
from ddist.objectives.minimax import ClassMemory, minimax_loss, minimax_terms
from ddist.objectives.rsm import l1_sparsity, rsm_loss


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_predict_x0_equals_the_schedulers_pred_original_sample(scheduler_cls):
    scheduler = scheduler_cls(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(20)
    gen = torch.Generator().manual_seed(0)
    z_t, eps = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = scheduler.timesteps[7]
    expected = scheduler.step(eps, t, z_t, generator=gen).pred_original_sample
    got = predict_x0(z_t, eps, scheduler.alphas_cumprod[t])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_predict_x0_takes_one_abar_per_sample():
    z_t, eps = torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    x0 = predict_x0(z_t, eps, torch.tensor([0.25, 1.0]))
    # (1 - sqrt(0.75)) / 0.5 for the first sample, (1 - 0) / 1 for the second
    assert torch.allclose(x0[0], torch.full((1, 2, 2), (1 - math.sqrt(0.75)) / 0.5))
    assert torch.allclose(x0[1], torch.ones(1, 2, 2))


def test_l1_sparsity_mean_is_the_per_sample_l1_norm_over_its_dimension_averaged_over_the_batch():
    x0 = torch.tensor([[[[1.0, -3.0], [0.0, 0.0]]], [[[0.0, 2.0], [-2.0, 0.0]]]])  # [2, 1, 2, 2], D = 4
    assert l1_sparsity(x0, "mean").item() == pytest.approx((4 / 4 + 4 / 4) / 2)


def test_l1_sparsity_sum_is_the_per_sample_l1_norm_averaged_over_the_batch():
    x0 = torch.tensor([[[[1.0, -3.0], [0.5, 0.0]]], [[[0.0, 2.0], [-2.0, 0.0]]]])  # ||.||_1 = 4.5 and 4
    assert l1_sparsity(x0, "sum").item() == pytest.approx((4.5 + 4.0) / 2)
    assert l1_sparsity(x0, "sum").item() == pytest.approx(4 * l1_sparsity(x0, "mean").item())  # D = 4 times
    with pytest.raises(ValueError, match="reduction"):
        l1_sparsity(x0, "max")


@pytest.mark.parametrize("reduction,dims", [("mean", 1), ("sum", 9)])
def test_rsm_loss_is_the_plain_loss_plus_lambda_times_the_l1_term(reduction, dims):
    gen = torch.Generator().manual_seed(1)
    eps_pred, eps, x0 = (torch.randn(4, 1, 3, 3, generator=gen) for _ in range(3))
    loss, parts = rsm_loss(eps_pred, eps, x0, lam=0.3, reduction=reduction)
    plain = ((eps_pred - eps) ** 2).mean()
    assert loss.item() == pytest.approx(plain.item() + 0.3 * dims * x0.abs().mean().item(), rel=1e-6)
    assert parts["plain"].item() == pytest.approx(denoising_loss(eps_pred, eps).item())


def test_class_memory_is_a_per_class_fifo():
    mem = ClassMemory(num_classes=3, size=2)
    mem.push(torch.tensor([[1.0], [2.0], [10.0]]), torch.tensor([0, 0, 1]))
    mem.push(torch.tensor([[3.0]]), torch.tensor([0]))
    assert mem.get(0).flatten().tolist() == [2.0, 3.0]  # the oldest (1.0) dropped
    assert mem.get(1).flatten().tolist() == [10.0]
    assert mem.get(2) is None


def test_minimax_terms_take_the_min_real_and_max_generated_similarity():
    real, gen = ClassMemory(2, 64), ClassMemory(2, 64)
    real.push(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 0]))  # cos to x: 1 and 1/sqrt(2)
    gen.push(torch.tensor([[0.0, 1.0], [-1.0, 1.0]]), torch.tensor([0, 0]))  # cos to x: 0 and -1/sqrt(2)
    x = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 1])  # class 1 has empty memories: contributes 0
    pos, neg = minimax_terms(x, y, real, gen)
    assert pos.item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2)
    assert neg.item() == pytest.approx(0.0)
    loss, _ = minimax_loss(x, x, x, y, real, gen, lambda_pos=0.5, lambda_neg=0.25)
    assert loss.item() == pytest.approx(0.5 * pos.item() + 0.25 * neg.item())  # eps_pred == eps: plain = 0


def test_cosine_kernel_and_dpp_loss_match_the_two_vector_closed_form():
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]]) * torch.tensor([[3.0], [0.5]])  # scale does not matter
    c = 1 / math.sqrt(2)
    assert torch.allclose(cosine_kernel(z), torch.tensor([[1.0, c], [c, 1.0]]))
    eps = 0.01
    assert dpp_loss(z, eps).item() == pytest.approx(-math.log((1 + eps) ** 2 - c**2), rel=1e-5)


def test_dm_loss_is_the_mean_squared_gap_to_the_scaled_real_mean():
    z = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean (2, 4)
    mu = torch.tensor([2.0, 2.0])  # sqrt(0.25) * mu = (1, 1)
    assert dm_loss(z, mu, abar_t=0.25).item() == pytest.approx((1**2 + 3**2) / 2)


def test_a_dpp_guidance_step_raises_log_det_k():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 4, 4, 4, generator=gen)
    z = base + 0.3 * torch.randn(6, 4, 4, 4, generator=gen)  # six similar latents

    def logdet(v):
        return torch.logdet(cosine_kernel(v)).item()

    moved = guidance_step(z, CgsTerms(eta_dpp=0.5, mu_dm=0.0, mu_real0=torch.zeros(4, 4, 4), abar_t=0.5, eps=1e-3))
    assert logdet(moved) > logdet(z) + 0.1


def test_clean_estimate_has_the_steps_value_and_the_eps_fixed_gradient():
    gen = torch.Generator().manual_seed(3)
    z, x0_hat, abar = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen), 0.25
    z.requires_grad_(True)
    out = clean_estimate(z, x0_hat, abar)
    assert torch.equal(out, x0_hat)
    (grad,) = torch.autograd.grad((out * torch.arange(4.0)).sum(), z)
    torch.testing.assert_close(grad, torch.arange(4.0).expand(3, 4) / 0.5)  # 1 / sqrt(0.25)


def test_a_dpp_step_on_clean_estimates_moves_them_apart_by_the_chain_rule():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 8, generator=gen)
    x0_hat = torch.randn(1, 8, generator=gen) + 0.3 * torch.randn(5, 8, generator=gen)  # similar estimates
    abar, eta = 0.6, 0.2

    def embed(v):
        return clean_estimate(v, x0_hat, abar)

    moved = guidance_step(
        z, CgsTerms(eta_dpp=eta, mu_dm=0.0, mu_real0=torch.zeros(8), abar_t=abar, eps=1e-3, embed=embed)
    )
    x = x0_hat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dpp_loss(x, 1e-3), x)
    torch.testing.assert_close(moved, z - eta * g / math.sqrt(abar))  # the x0_hat gradient, through 1/sqrt(abar)

    # the estimates the next step sees (z moved, eps held fixed) span more volume
    def logdet(v):
        return torch.logdet(cosine_kernel(v)).item()

    assert logdet(x0_hat + (moved - z) / math.sqrt(abar)) > logdet(x0_hat)


def test_a_dpp_step_through_a_feature_map_raises_the_features_log_det():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 6)
    ).requires_grad_(False)
    z = torch.randn(1, 1, 4, 4, generator=gen) + 0.2 * torch.randn(5, 1, 4, 4, generator=gen)

    def logdet(v):
        return torch.logdet(cosine_kernel(net(v))).item()

    def embed(v):
        return net(clean_estimate(v, z, 1.0))

    moved = guidance_step(
        z, CgsTerms(eta_dpp=0.05, mu_dm=0.0, mu_real0=torch.zeros(1, 4, 4), abar_t=1.0, eps=1e-3, embed=embed)
    )
    assert (moved - z).abs().max() > 0  # the gradient reaches z through the network
    assert logdet(moved) > logdet(z)


def test_a_dm_guidance_step_shrinks_the_mean_gap_by_the_documented_factor():
    gen = torch.Generator().manual_seed(4)
    n, d, mu_dm, abar = 10, 64, 80.0, 0.36
    z = torch.randn(n, d, generator=gen) + 2.0
    mu = torch.randn(d, generator=gen)

    def gap(v):
        return v.mean(0) - math.sqrt(abar) * mu

    moved = guidance_step(z, CgsTerms(eta_dpp=0.0, mu_dm=mu_dm, mu_real0=mu, abar_t=abar, eps=1e-3))
    torch.testing.assert_close(gap(moved), (1 - 2 * mu_dm / (n * d)) * gap(z))
    assert gap(moved).norm() < gap(z).norm()


def test_guidance_with_zero_weights_leaves_the_latents_unchanged():
    z = torch.randn(4, 3, 2, 2)
    out = guidance_step(z, CgsTerms(eta_dpp=0.0, mu_dm=0.0, mu_real0=torch.ones(3, 2, 2), abar_t=0.9, eps=1e-3))
    assert torch.equal(out, z)


def test_size_step_none_noise_std_and_cap_by_hand():
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # ||z|| = 5 and 1
    step = torch.tensor([[0.6, 0.8], [0.0, 0.02]])  # ||step|| = 1 and 0.02
    assert torch.equal(size_step(step, z, "none", 0.36, 0.1), step)
    torch.testing.assert_close(size_step(step, z, "noise_std", 0.36, 0.1), 0.8 * step)  # sqrt(1 - 0.36)
    assert torch.equal(size_step(step, z, "noise_std", 1.0, 0.1), torch.zeros(2, 2))  # clean latents stay
    # cap 0.1: the first step (1 > 0.1 * 5) shortens to length 0.5, direction kept; the second (0.02 <= 0.1) stays
    torch.testing.assert_close(size_step(step, z, "cap", 0.36, 0.1), torch.tensor([[0.3, 0.4], [0.0, 0.02]]))
    with pytest.raises(ValueError, match="step norm"):
        size_step(step, z, "unit", 0.36, 0.1)


def test_a_sized_guidance_step_resizes_the_dpp_step_only():
    gen = torch.Generator().manual_seed(6)
    n, d, mu_dm, abar = 4, 16, 10.0, 0.36
    z = torch.randn(1, d, generator=gen) + 0.3 * torch.randn(n, d, generator=gen)
    mu = torch.randn(d, generator=gen)
    common = {"mu_real0": mu, "abar_t": abar, "eps": 1e-3}
    dpp = z - guidance_step(z, CgsTerms(eta_dpp=2.0, mu_dm=0.0, **common))
    dm = z - guidance_step(z, CgsTerms(eta_dpp=0.0, mu_dm=mu_dm, **common))
    for norm, max_step in [("noise_std", 1.0), ("cap", 1e-3)]:
        moved = guidance_step(z, CgsTerms(eta_dpp=2.0, mu_dm=mu_dm, **common), StepSize(norm, max_step))
        torch.testing.assert_close(z - moved, size_step(dpp, z, norm, abar, max_step) + dm)
    capped = z - guidance_step(z, CgsTerms(eta_dpp=2.0, mu_dm=0.0, **common), StepSize("cap", 1e-3))
    torch.testing.assert_close(capped.norm(dim=1), 1e-3 * z.norm(dim=1))  # every raw step here is longer
