"""The per-class covariance figures (ddist.metrics.covariance) against values computed by hand."""

import json

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
    assert figs["min_eigenvalue"] == pytest.approx(2 / 3)
    assert figs["condition_number"] == pytest.approx(3.0)


def test_fewer_points_than_dimensions_use_the_spanned_spectrum():
    # n = 2 in d = 3: centred +-(1, 1, 0), Cov = [[1,1,0],[1,1,0],[0,0,0]], eigenvalues 2, 0, 0;
    # two points span one direction, so the figures are over the top eigenvalue alone
    feats = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    assert spanned_eigenvalues(feats).tolist() == pytest.approx([2.0])
    figs = covariance_figures(feats)
    assert figs["mean_diagonal"] == pytest.approx(2 / 3)
    assert figs["offdiag_norm"] == pytest.approx(2**0.5)
    assert (figs["min_eigenvalue"], figs["condition_number"]) == (pytest.approx(2.0), pytest.approx(1.0))


def test_gram_and_covariance_spectra_agree():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 20, generator=g).relu()  # n < d: through the 6 x 6 Gram matrix
    centred = feats.double() - feats.double().mean(0)
    full = torch.linalg.eigvalsh(centred.T @ centred / 6).flip(0)[:5]
    torch.testing.assert_close(spanned_eigenvalues(feats), full)


def test_degenerate_classes_give_null_not_inf():
    collinear = covariance_figures(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))  # rank 1 < n - 1 = 2
    assert collinear["min_eigenvalue"] == pytest.approx(0.0, abs=1e-12)
    assert collinear["condition_number"] is None
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
    assert figs["condition_number_per_class"] == [pytest.approx(3.0), None, None]
    assert (figs["condition_number"], figs["condition_number_classes"]) == (pytest.approx(3.0), 1)
    # class 1: Cov = (2/3) [[1,1],[1,1]], mean diagonal 2/3
    assert figs["mean_diagonal"] == pytest.approx((4 / 3 + 2 / 3) / 2)
    assert figs["mean_diagonal_classes"] == 2
    json.dumps(figs, allow_nan=False)  # strict JSON: no inf or NaN anywhere
