"""Per-class covariance figures of a feature matrix: what DEDA's diversity regulariser acts on.

For the features f [n, d] of one class, Cov = (1/n) sum (f - mu)(f - mu)^T (the biased
estimator DEDA uses), and four figures (the quantities of the seed's Theorem 1):

- mean_diagonal: mean(diag Cov), the average per-feature variance (raised by the
  supplement's Eq. 11);
- offdiag_norm: ||Cov - Diag(Cov)||_F (its square is minimised by the supplement's Eq. 12);
- min_eigenvalue and condition_number (lambda_max / lambda_min) of Cov.

reading: with n <= d points (IPC 10 against d = 128 or 512 features) the centred features
span at most n - 1 dimensions, so Cov's smallest eigenvalue is 0 and its condition number
infinite for every set, whatever its diversity. The figures are therefore taken over the
top r = min(n - 1, d) eigenvalues, the spectrum the points can span: with n - 1 < d these
are the nonzero eigenvalues of Cov, computed as those of the n x n Gram matrix
(1/n) F_c F_c^T of the centred features (the same nonzero eigenvalues, and cheap); with
n > d all d eigenvalues of Cov. A set whose points are collapsed onto fewer than r
directions has lambda_r <= RTOL * lambda_1: its condition number is None (JSON null,
"numerically singular") rather than a huge or infinite float.
"""

from __future__ import annotations

import math

import torch

# An eigenvalue below this fraction of the largest counts as zero (numerical rank).
RTOL = 1e-9
FIGURES = ("mean_diagonal", "offdiag_norm", "min_eigenvalue", "condition_number")


def covariance(feats: torch.Tensor) -> torch.Tensor:
    """Biased covariance [d, d] of features [n, d], in float64."""
    x = feats.double()
    x = x - x.mean(0, keepdim=True)
    return x.T @ x / len(x)


def spanned_eigenvalues(feats: torch.Tensor) -> torch.Tensor:
    """The top min(n - 1, d) eigenvalues of the biased covariance of features [n, d], descending,
    via the smaller of the d x d covariance and the n x n Gram matrix (equal nonzero spectra)."""
    x = feats.double()
    x = x - x.mean(0, keepdim=True)
    n, d = x.shape
    small = x.T @ x if d <= n else x @ x.T
    eig = torch.linalg.eigvalsh(small / n).flip(0).clamp_min(0)  # clamp: rounding can give -1e-17
    return eig[: min(n - 1, d)]


def covariance_figures(feats: torch.Tensor) -> dict[str, float | None]:
    """The four figures of one class's features [n, d]; all None when n < 2 (no covariance)."""
    if len(feats) < 2:
        return dict.fromkeys(FIGURES)
    cov = covariance(feats)
    diag = cov.diagonal()
    eig = spanned_eigenvalues(feats)
    singular = bool(eig[-1] <= RTOL * eig[0])
    return {
        "mean_diagonal": float(diag.mean()),
        "offdiag_norm": float((cov - torch.diag(diag)).norm()),
        "min_eigenvalue": float(eig[-1]),
        "condition_number": None if singular else float(eig[0] / eig[-1]),
    }


def class_covariance_figures(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Per-class figures of features [N, d] (lists over classes 0..num_classes-1, None where a
    class has fewer than two images or its condition number is undefined) and, per figure,
    the mean over the classes where it is defined, with how many those are."""
    per_class = [covariance_figures(feats[labels == c]) for c in range(num_classes)]
    out: dict = {}
    for key in FIGURES:
        values = [f[key] for f in per_class]
        defined = [v for v in values if v is not None]
        out[key] = math.fsum(defined) / len(defined) if defined else None
        out[f"{key}_classes"] = len(defined)
        out[f"{key}_per_class"] = values
    return out
