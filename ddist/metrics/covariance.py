"""Per-class covariance figures of a feature matrix: what DEDA's diversity regulariser acts on,
and the premises and bound of the seed's Theorem 1.

For the features f [n, d] of one class, Cov = (1/n) sum (f - mu)(f - mu)^T (the biased
estimator DEDA uses). Theorem 1 assumes sigma2_min <= Var(f_i) <= sigma2_max for every feature
and |Cov_ij| <= eps for every i != j, and bounds the smallest eigenvalue of Cov by Gershgorin's
circle theorem: lambda_min >= sigma2_min - (d - 1) eps. Per class:

- mean_diagonal: mean(diag Cov), the average per-feature variance (raised by the
  supplement's Eq. 11);
- offdiag_norm: ||Cov - Diag(Cov)||_F (its square is minimised by the supplement's Eq. 12);
- offdiag_relative: ||Cov - Diag(Cov)||_F / ||Diag(Cov)||_F, the off-diagonal in units of the
  variances; unchanged by one global rescaling of the features, so it says whether a set is
  less correlated, not merely smaller;
- sigma2_min, sigma2_max: the smallest and largest feature variance (Theorem 1's premises);
- eps: max_{i != j} |Cov_ij|, the largest off-diagonal magnitude (its premise);
- gershgorin_bound: sigma2_min - (d - 1) eps, the theorem's lower bound on lambda_min (the class
  means report, besides its mean, the share of classes where it is positive: `_positive_share`);
- spanned_log_det: the sum of the logs of the spanned eigenvalues (below; the seed's Step 4);
- spanned_min_eigenvalue and spanned_condition_number (lambda_1 / lambda_r) of that spectrum.

reading: with n <= d points (IPC 10 against d = 128 or 512 features) the centred features
span at most n - 1 dimensions, so Cov's smallest eigenvalue is 0 for every set, whatever its
diversity (and the Gershgorin bound is then necessarily <= 0). The spanned figures are taken
over the top r = min(n - 1, d) eigenvalues, the spectrum the points can span: with n - 1 < d
these are the nonzero eigenvalues of Cov, computed as those of the n x n Gram matrix
(1/n) F_c F_c^T of the centred features (the same nonzero eigenvalues, and cheap); with n > d
all d eigenvalues of Cov. They compare sets only at equal n (IPC): r changes with n. A set
whose points are collapsed onto fewer than r directions has lambda_r <= RTOL * lambda_1: its
condition number and log det are None (JSON null, "numerically singular") rather than huge or
infinite floats.
"""

from __future__ import annotations

import math

import torch

# An eigenvalue below this fraction of the largest counts as zero (numerical rank).
RTOL = 1e-9
FIGURES = (
    "mean_diagonal",
    "offdiag_norm",
    "offdiag_relative",
    "sigma2_min",
    "sigma2_max",
    "eps",
    "gershgorin_bound",
    "spanned_log_det",
    "spanned_min_eigenvalue",
    "spanned_condition_number",
)


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
    """The figures (FIGURES) of one class's features [n, d]; all None when n < 2 (no covariance)."""
    if len(feats) < 2:
        return dict.fromkeys(FIGURES)
    cov = covariance(feats)
    diag = cov.diagonal()
    off = cov - torch.diag(diag)
    d = cov.shape[0]
    eps = float(off.abs().max()) if d > 1 else 0.0
    eig = spanned_eigenvalues(feats)
    singular = bool(eig[-1] <= RTOL * eig[0])
    diag_norm = float(diag.norm())
    return {
        "mean_diagonal": float(diag.mean()),
        "offdiag_norm": float(off.norm()),
        "offdiag_relative": float(off.norm()) / diag_norm if diag_norm > 0 else None,
        "sigma2_min": float(diag.min()),
        "sigma2_max": float(diag.max()),
        "eps": eps,
        "gershgorin_bound": float(diag.min()) - (d - 1) * eps,
        "spanned_log_det": None if singular else float(eig.log().sum()),
        "spanned_min_eigenvalue": float(eig[-1]),
        "spanned_condition_number": None if singular else float(eig[0] / eig[-1]),
    }


def class_covariance_figures(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Per-class figures of features [N, d] (lists over classes 0..num_classes-1, None where a
    class has fewer than two images or a figure is undefined) and, per figure, the mean over the
    classes where it is defined, with how many those are; for the Gershgorin bound also the share
    of those classes where it is positive (the theorem then guarantees lambda_min > 0)."""
    per_class = [covariance_figures(feats[labels == c]) for c in range(num_classes)]
    out: dict = {}
    for key in FIGURES:
        values = [f[key] for f in per_class]
        defined = [v for v in values if v is not None]
        out[key] = math.fsum(defined) / len(defined) if defined else None
        out[f"{key}_classes"] = len(defined)
        out[f"{key}_per_class"] = values
    bounds = [v for v in out["gershgorin_bound_per_class"] if v is not None]
    out["gershgorin_bound_positive_share"] = sum(v > 0 for v in bounds) / len(bounds) if bounds else None
    return out
