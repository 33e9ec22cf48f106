"""Frechet distances between a real and a synthetic image set.

Two flavours, never confused in the results:

- `fid`: the standard FID (Heusel et al., NeurIPS 2017), torchmetrics'
  FrechetInceptionDistance on InceptionV3 pool features. It needs the torch-fidelity
  package and the InceptionV3 weights file on disk (`analyse.fid.weights=PATH`, the file
  torch-fidelity would otherwise download: weights-inception-2015-12-05-6726825d.pth);
  nothing is fetched at run time.
- `fd_teacher`: the same distance in the teacher's penultimate feature space. It works
  offline with no extra weights, but its values depend on the teacher and are not
  comparable with published FIDs.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import torch

from ddist.errors import CheckpointError, ConfigError


def _centred(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] of features [N, D] (N >= 2) and the centred features scaled by 1 / sqrt(N - 1), in float64."""
    x = feats.double()
    if x.shape[0] < 2:
        raise ValueError("a Frechet distance needs at least two samples per set")
    mu = x.mean(0)
    return mu, (x - mu) / (x.shape[0] - 1) ** 0.5


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64 (N >= 2)."""
    mu, xc = _centred(feats)
    return mu, xc.T @ xc


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (tiny negative eigenvalues -> 0)."""
    vals, vecs = torch.linalg.eigh((mat + mat.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2):

        d^2 = ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^1/2 cov2 cov1^1/2)^1/2)

    (Dowson & Landau 1982; the FID formula of Heusel et al. 2017, Eq. 6). The trace term
    uses tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2), whose argument is symmetric PSD, so both
    square roots come from `eigh` instead of a general (and sometimes complex) sqrtm.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return float(d2.clamp_min(0))


def frechet_distance_features(real_feats: torch.Tensor, syn_feats: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D] (`fd_teacher`).

    With fewer samples than dimensions (a distilled set of 100 in a 2048-d ConvNet space) it skips
    the D x D eigendecompositions: with X, Y the centred features scaled by 1/sqrt(N - 1), so that
    cov1 = X^T X and cov2 = Y^T Y, the nonzero eigenvalues of cov1^1/2 cov2 cov1^1/2 are those of
    cov1 cov2 = X^T (X Y^T) Y, i.e. of (X Y^T)(X Y^T)^T, so tr((cov1^1/2 cov2 cov1^1/2)^1/2) is the
    nuclear norm of the N1 x N2 matrix X Y^T, and tr(cov) = ||X||_F^2. Exact, not an approximation.
    """
    if min(len(real_feats), len(syn_feats)) >= real_feats.shape[1]:
        return frechet_distance(*feature_stats(real_feats), *feature_stats(syn_feats))
    (mu1, x), (mu2, y) = _centred(real_feats), _centred(syn_feats)
    trace_sqrt = torch.linalg.svdvals(x @ y.T).sum()
    d2 = (mu1 - mu2).square().sum() + x.square().sum() + y.square().sum() - 2 * trace_sqrt
    return float(d2.clamp_min(0))


def check_inception_weights(weights: str | Path) -> Path:
    """Validate `analyse.fid.weights` before torchmetrics touches it; return the resolved path.

    torch-fidelity unpickles the file with weights_only=False, so it is first opened here
    with weights_only=True: a file that is not a plain state dict is refused.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ConfigError(
            "analyse.fid.weights is set, but the standard FID needs the torch-fidelity package "
            "(pip install torch-fidelity). Install it, or set analyse.fid.weights=null to report "
            "the teacher-space Frechet distance (fd_teacher) instead."
        )
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"analyse.fid.weights={weights} does not exist. Set it to the InceptionV3 weights file "
            "used by torch-fidelity (weights-inception-2015-12-05-6726825d.pth), or to null to "
            "report the teacher-space Frechet distance (fd_teacher) instead."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"Cannot read {path} as a state dict ({type(err).__name__}). Set analyse.fid.weights to "
            "torch-fidelity's InceptionV3 weights file, or to null."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict; set analyse.fid.weights to the InceptionV3 weights.")
    return path


def inception_fid(
    real01: torch.Tensor, syn01: torch.Tensor, weights: str | Path, device: torch.device, batch_size: int = 64
) -> float:
    """Standard FID between two image sets in [0, 1], [N, C, H, W] (C = 1 or 3).

    Grey images are repeated to three channels; torchmetrics resizes to 299x299 itself.
    """
    path = check_inception_weights(weights)
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
    metric = metric.to(device)
    for images, real in ((real01, True), (syn01, False)):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).float().clamp(0, 1)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            metric.update(batch, real=real)
    return float(metric.compute())
