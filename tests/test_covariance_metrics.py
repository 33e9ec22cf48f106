"""The per-class covariance figures (ddist.metrics.covariance) against values computed by hand."""

import json
import math

import pytest
import torch

from ddist.metrics.covariance import (
    class_covariance_figures,
    covariance_figures,
    spanned_eigenvalues,
)


def test_figures_of_an_uncorrelated_class_by_hand():
    # mean (1, 1); centred (-1,-1), (1,-1), (0,2): Cov = diag(2/3, 2), n - 1 = d = 2 eigenvalues
    figs = covariance_figures(torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]]))
    assert figs["mean_diagonal"] == pytest.approx(4 / 3)
    assert figs["offdiag_norm"] == pytest.approx(0.0)
    assert figs["spanned_min_eigenvalue"] == pytest.approx(2 / 3)
    assert figs["spanned_condition_number"] == pytest.approx(3.0)


def points(a: list[list[float]]) -> torch.Tensor:
    """The rows of A and their negatives: mean 0 and biased covariance A^T A / len(A)."""
    t = torch.tensor(a)
    return torch.cat([t, -t])


def test_theorem_1_premises_and_bound_by_hand():
    # A = [[1,0,0],[0,1,1],[0,0,1]]: Cov = A^T A / 3 = [[1,0,0],[0,1,1],[0,1,2]] / 3
    figs = covariance_figures(points([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    assert (figs["sigma2_min"], figs["sigma2_max"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert figs["eps"] == pytest.approx(1 / 3)  # max |Cov_ij|, i != j
    assert figs["gershgorin_bound"] == pytest.approx(1 / 3 - 2 * (1 / 3))  # sigma2_min - (d - 1) eps
    # det A^T A = det(A)^2 = 1: log det Cov = log(1 / 27); eigenvalues 1/3 and (3 -+ sqrt 5) / 6
    assert figs["spanned_log_det"] == pytest.approx(-math.log(27))
    assert figs["spanned_min_eigenvalue"] == pytest.approx((3 - 5**0.5) / 6)
    assert figs["spanned_condition_number"] == pytest.approx((3 + 5**0.5) / (3 - 5**0.5))
    # ||off||_F = sqrt(2) / 3, ||diag||_F = sqrt(6) / 3
    assert figs["offdiag_norm"] == pytest.approx(2**0.5 / 3)
    assert figs["offdiag_relative"] == pytest.approx(1 / 3**0.5)


def test_gershgorin_share_counts_the_classes_with_a_positive_bound():
    negative = points([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    # Cov = [[4,0,0],[0,4.25,1],[0,1,4]] / 3: 4/3 - 2 (1/3) = 2/3 > 0
    positive = points([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.5, 2.0]])
    figs = class_covariance_figures(torch.cat([negative, positive]), torch.tensor([0] * 6 + [1] * 6), 2)
    assert figs["gershgorin_bound_per_class"] == [pytest.approx(-1 / 3), pytest.approx(2 / 3)]
    assert figs["gershgorin_bound_positive_share"] == 0.5


def test_fewer_points_than_dimensions_use_the_spanned_spectrum():
    # n = 2 in d = 3: centred +-(1, 1, 0), Cov = [[1,1,0],[1,1,0],[0,0,0]], eigenvalues 2, 0, 0;
    # two points span one direction, so the figures are over the top eigenvalue alone
    feats = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    assert spanned_eigenvalues(feats).tolist() == pytest.approx([2.0])
    figs = covariance_figures(feats)
    assert figs["mean_diagonal"] == pytest.approx(2 / 3)
    assert figs["offdiag_norm"] == pytest.approx(2**0.5)
    assert (figs["spanned_min_eigenvalue"], figs["spanned_condition_number"]) == (
        pytest.approx(2.0),
        pytest.approx(1.0),
    )


def test_gram_and_covariance_spectra_agree():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 20, generator=g).relu()  # n < d: through the 6 x 6 Gram matrix
    centred = feats.double() - feats.double().mean(0)
    full = torch.linalg.eigvalsh(centred.T @ centred / 6).flip(0)[:5]
    torch.testing.assert_close(spanned_eigenvalues(feats), full)


def test_degenerate_classes_give_null_not_inf():
    collinear = covariance_figures(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))  # rank 1 < n - 1 = 2
    assert collinear["spanned_min_eigenvalue"] == pytest.approx(0.0, abs=1e-12)
    assert collinear["spanned_condition_number"] is None
    assert set(covariance_figures(torch.ones(1, 3)).values()) == {None}  # one image: no covariance


def test_class_figures_per_class_and_means_over_defined_classes():
    feats = torch.tensor(
        [
            [0.0, 0.0],
            [2.0, 0.0],
            [1.0, 3.0],  # class 0: condition number 3
            [0.0, 0.0],
            [1.0, 1.0],
            [2.0, 2.0],  # class 1: collinear, condition null
            [5.0, 5.0],
        ]
    )  # class 2: one image
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    figs = class_covariance_figures(feats, labels, 3)
    assert figs["spanned_condition_number_per_class"] == [pytest.approx(3.0), None, None]
    assert (figs["spanned_condition_number"], figs["spanned_condition_number_classes"]) == (pytest.approx(3.0), 1)
    # class 1: Cov = (2/3) [[1,1],[1,1]], mean diagonal 2/3
    assert figs["mean_diagonal"] == pytest.approx((4 / 3 + 2 / 3) / 2)
    assert figs["mean_diagonal_classes"] == 2
    json.dumps(figs, allow_nan=False)  # strict JSON: no inf or NaN anywhere
