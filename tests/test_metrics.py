"""Each metric against values computed by hand on tiny inputs."""

import math

import pytest
import torch

from ddist.errors import ConfigError
from ddist.metrics import diversity, fid, robust, spectrum

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------- diversity


def test_identical_images_have_zero_prototype_distance_and_ssim_one():
    img = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = img.expand(4, -1, -1, -1).clone()
    labels = torch.tensor([0, 0, 1, 1])
    feats = torch.tensor([[1.0, 2.0, 3.0]]).expand(4, -1)
    per_class, overall = diversity.prototype_cosine_distance(feats, labels, num_classes=2)
    assert torch.allclose(per_class, torch.zeros(2), atol=1e-6)
    assert overall == pytest.approx(0.0, abs=1e-6)
    ssim_per_class, ssim = diversity.within_class_ssim(images, labels, num_classes=2)
    assert ssim == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(ssim_per_class, torch.ones(2), atol=1e-5)


def test_prototype_distance_by_hand():
    # Class 0: [1,0] and [0,1], centre [.5,.5], cosine 1/sqrt2 each -> distance 1 - 1/sqrt2.
    # Class 1: a single image, its own centre -> 0.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    per_class, overall = diversity.prototype_cosine_distance(feats, labels, num_classes=3)
    d = 1 - 1 / SQRT2
    assert per_class[0].item() == pytest.approx(d, abs=1e-6)
    assert per_class[1].item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(per_class[2].item())  # absent class
    assert overall == pytest.approx(2 * d / 3, abs=1e-6)


def test_prototype_distance_to_given_centres():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0])
    centres = torch.tensor([[0.0, 1.0]])  # orthogonal prototype -> distance 1
    _, overall = diversity.prototype_cosine_distance(feats, labels, 1, centres=centres)
    assert overall == pytest.approx(1.0)


def test_ssim_of_constant_images_by_hand():
    # Constant images have zero variance, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), C1 = 0.01^2.
    images = torch.stack([torch.full((1, 8, 8), v) for v in (0.2, 0.2, 0.6)])
    x = (2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4)
    assert diversity.mean_pairwise_ssim(images) == pytest.approx((1 + 2 * x) / 3, abs=1e-4)


@pytest.mark.parametrize("shape", [(6, 1, 16, 16), (5, 3, 32, 32), (4, 3, 6, 9)])
def test_ssim_equals_torchmetrics(shape):
    # ddist's SSIM is written out (analyse need not import torchmetrics); it must give torchmetrics'
    # numbers, on pairs that are alike (a shared image plus noise), so the structure term matters
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    base = torch.rand(shape[1:], generator=g)
    images = (base + 0.3 * torch.rand(shape, generator=g)).clamp(0, 1)
    i, j = torch.triu_indices(shape[0], shape[0], offset=1)
    expected = structural_similarity_index_measure(images[i], images[j], data_range=1.0, reduction="none")
    assert float(expected.mean()) > 0.3
    assert diversity.mean_pairwise_ssim(images) == pytest.approx(float(expected.mean()), abs=1e-5)
    assert diversity.mean_pairwise_ssim(images, chunk=4) == pytest.approx(float(expected.mean()), abs=1e-5)


def test_pairwise_cosine_by_hand():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: 0, 1/sqrt2, 1/sqrt2
    assert diversity.mean_pairwise_cosine(feats) == pytest.approx(SQRT2 / 3, abs=1e-6)
    per_class, overall = diversity.within_class_cosine(feats, torch.tensor([0, 0, 1]), 2)
    assert per_class[0].item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(per_class[1].item())  # one image: no pair
    assert overall == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- spectrum


def test_orthogonal_set_has_full_effective_rank_and_flat_spectrum():
    # Rows +-e_i: zero mean, so centring keeps them; all singular values equal sqrt2.
    eye = torch.eye(4)
    feats = torch.cat([eye, -eye])
    summary = spectrum.spectrum_summary(feats)
    assert summary["effective_rank"] == pytest.approx(4.0, abs=1e-6)
    assert summary["decay_slope"] == pytest.approx(0.0, abs=1e-6)
    assert summary["normalized_singular_values"] == pytest.approx([1.0] * 4)


def test_effective_rank_by_hand():
    # sigma = (2, 1): p = (2/3, 1/3), erank = exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.88988...
    feats = torch.diag(torch.tensor([2.0, 1.0]))
    sigma = spectrum.singular_values(feats, center=False)
    assert spectrum.effective_rank(sigma) == pytest.approx(1.8898816, abs=1e-6)
    rank_one = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    assert spectrum.effective_rank(spectrum.singular_values(rank_one, center=False)) == pytest.approx(1.0)


def test_decay_slope_recovers_power_law():
    sigma = torch.arange(1, 9, dtype=torch.float64) ** -2.0  # sigma_i = i^-2
    feats = torch.diag(sigma)
    s = spectrum.singular_values(feats, center=False)
    assert spectrum.decay_slope(s) == pytest.approx(-2.0, abs=1e-9)
    assert math.isnan(spectrum.decay_slope(s[:1]))


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_one_dimensional_by_hand():
    # N(0,1) vs N(1,4): 1 + 1 + 4 - 2 sqrt(4) = 2
    d = fid.frechet_distance(torch.zeros(1), torch.ones(1, 1), torch.ones(1), torch.full((1, 1), 4.0))
    assert d == pytest.approx(2.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov1, cov2 = a @ a.T, b @ b.T
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm((cov1 @ cov2).numpy()).real
    expected = float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * covmean.trace())
    assert fid.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_features_is_zero():
    feats = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    assert fid.frechet_distance_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shifted = fid.frechet_distance_features(feats, feats + 1.0)
    assert shifted == pytest.approx(6.0, abs=1e-6)  # mean moves by 1 in each of 6 dims


@pytest.mark.parametrize("n_real", [5, 40])  # fewer samples than dimensions (the nuclear-norm form) and more
def test_frechet_distance_of_features_equals_the_covariance_formula(n_real):
    g = torch.Generator().manual_seed(2)
    real = torch.randn(n_real, 12, generator=g) @ torch.randn(12, 12, generator=g)
    syn = torch.randn(7, 12, generator=g) * 2 + 0.5
    expected = fid.frechet_distance(*fid.feature_stats(real), *fid.feature_stats(syn))
    # rel 1e-6: the eigh form takes square roots of the rank-deficient covariances' ~1e-16 eigenvalues
    assert fid.frechet_distance_features(real, syn) == pytest.approx(expected, rel=1e-6)
    assert expected > 1.0  # not the trivial zero


def test_missing_inception_weights_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="analyse.fid.weights"):
        fid.check_inception_weights(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- robust scores


def test_lrs_by_hand():
    hlr = robust.hard_label_recovery(acc_real_hard=0.9, acc_syn_hard=0.7)  # 0.2
    ior = robust.improvement_over_random(acc_syn=0.6, acc_random=0.5)  # 0.1
    assert hlr == pytest.approx(0.2) and ior == pytest.approx(0.1)
    # alpha = 0.5*0.1 - 0.5*0.2 = -0.05; (e^-0.05 - e^-1) / (e - e^-1) = 0.2481915...
    assert robust.label_robust_score(hlr, ior, w=0.5) == pytest.approx(0.24819154, abs=1e-8)
    assert robust.label_robust_score(0.0, 0.0) == pytest.approx(0.26894142, abs=1e-8)
    assert robust.label_robust_score(hlr=-1.0, ior=1.0) == pytest.approx(1.0)  # alpha = 1
    assert robust.label_robust_score(hlr=1.0, ior=-1.0) == pytest.approx(0.0)  # alpha = -1
    with pytest.raises(ValueError):
        robust.label_robust_score(0.0, 0.0, w=1.5)


def test_ars_by_hand():
    # beta = 0.5*(0.6-0.5) + 0.5*(0.4-0.45) = 0.025 -> (e^0.025 - e^-1)/(e - e^-1) = 0.2797119...
    ars = robust.augmentation_robust_score(0.6, 0.5, 0.4, 0.45, gamma=0.5)
    assert ars == pytest.approx(0.27971197, abs=1e-8)
    # gamma = 1 uses only the augmented pair: beta = 0.1
    expected = (math.exp(0.1) - math.exp(-1)) / (math.e - math.exp(-1))
    assert robust.augmentation_robust_score(0.6, 0.5, 0.4, 0.45, gamma=1.0) == pytest.approx(expected)


def test_robust_scores_uses_only_available_inputs():
    partial = robust.robust_scores({"syn": 0.6, "random": 0.5})
    assert partial == pytest.approx({"ior": 0.1})
    full = robust.robust_scores(
        {"syn": 0.6, "random": 0.5, "syn_hard": 0.7, "real_hard": 0.9, "syn_noaug": 0.4, "random_noaug": 0.45}
    )
    assert full["lrs"] == pytest.approx(0.24819154, abs=1e-8)
    assert full["ars"] == pytest.approx(0.27971197, abs=1e-8)
