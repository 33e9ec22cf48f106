"""The analyse stage's record of a set: its metrics next to the real reference (diversity,
spectrum, fd_teacher, per-class covariance figures), their headline, and the record without
its per-sample arrays. Tensors (and the teacher, for its features) in, plain dicts out.
"""

from __future__ import annotations

import math

import torch

from ddist.metrics import covariance, diversity, fid, spectrum
from ddist.models import FeatureModel


@torch.inference_mode()
def features(
    model: FeatureModel, x: torch.Tensor, device: torch.device, key: str = "penultimate", batch_size: int = 256
) -> torch.Tensor:
    """The model's `key` features (FeatureModel.features) of normalised images [N,C,H,W], on the CPU."""
    feats = [model.features(x[i : i + batch_size].to(device))[key].float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(feats)


def set_metrics(syn_x, syn_y, syn_f, real_x, real_y, real_f, same_pos, spec) -> dict:
    """Diversity, spectrum and fd_teacher of the synthetic set next to the real reference."""
    k = spec.num_classes
    syn01, same01 = spec.denormalize(syn_x).clamp(0, 1), spec.denormalize(real_x[same_pos]).clamp(0, 1)
    same_f, same_y = real_f[same_pos], real_y[same_pos]
    syn_pd, syn_pd_all = diversity.prototype_cosine_distance(syn_f, syn_y, k)
    same_pd, same_pd_all = diversity.prototype_cosine_distance(same_f, same_y, k)
    real_pd, real_pd_all = diversity.prototype_cosine_distance(real_f, real_y, k)
    real_centres = diversity.class_centres(real_f, real_y, k)
    _, to_real = diversity.prototype_cosine_distance(syn_f, syn_y, k, centres=real_centres)
    syn_ssim, syn_ssim_all = diversity.within_class_ssim(syn01, syn_y, k)
    real_ssim, real_ssim_all = diversity.within_class_ssim(same01, same_y, k)
    syn_cos, syn_cos_all = diversity.within_class_cosine(syn_f, syn_y, k)
    real_cos, real_cos_all = diversity.within_class_cosine(same_f, same_y, k)
    return {
        "prototype_distance": {
            "synthetic": syn_pd_all,
            "real_same_ipc": same_pd_all,
            "real": real_pd_all,
            "synthetic_to_real_centres": to_real,
            "synthetic_per_class": _list(syn_pd),
            "real_same_ipc_per_class": _list(same_pd),
            "real_per_class": _list(real_pd),
            **(
                {"note": "IPC 1: each image is its class's prototype, so synthetic and real_same_ipc are 0"}
                if len(syn_y) <= k
                else {}
            ),
        },
        "ssim": {
            "synthetic": syn_ssim_all,
            "real_same_ipc": real_ssim_all,
            "synthetic_per_class": _list(syn_ssim),
            "real_same_ipc_per_class": _list(real_ssim),
        },
        "feature_cosine": {
            "synthetic": syn_cos_all,
            "real_same_ipc": real_cos_all,
            "synthetic_per_class": _list(syn_cos),
            "real_same_ipc_per_class": _list(real_cos),
        },
        "spectrum": {
            "synthetic": spectrum.spectrum_summary(syn_f),
            "real_same_ipc": spectrum.spectrum_summary(same_f),
            "real": spectrum.spectrum_summary(real_f),
        },
        "fd_teacher": fid.frechet_distance_features(real_f, syn_f) if len(syn_f) > 1 else None,
    }


def covariance_metrics(syn_f, syn_y, same_f, same_y, num_classes: int, layer: str) -> dict:
    """Per-class covariance figures of the synthetic set and of real images at the same IPC."""
    return {
        "layer": layer,
        "dim": int(syn_f.shape[1]),
        "note": "per class (n images, d features): Theorem 1's premises sigma2_min, sigma2_max, eps and its "
        "Gershgorin bound sigma2_min - (d - 1) eps; spanned_*: over the top min(n - 1, d) eigenvalues of the "
        "covariance, comparable only at equal IPC; null: fewer than two images, or a numerically zero "
        "eigenvalue among the spanned ones",
        "synthetic": covariance.class_covariance_figures(syn_f, syn_y, num_classes),
        "real_same_ipc": covariance.class_covariance_figures(same_f, same_y, num_classes),
    }


def _list(t: torch.Tensor) -> list:
    """Per-class values for JSON: NaN (a class without enough images) becomes null."""
    return [None if math.isnan(v) else float(v) for v in t.tolist()]


def headline(analysis: dict) -> dict[str, float]:
    """The scalar summary logged to the console and W&B."""
    out = {
        "prototype_distance": analysis["prototype_distance"]["synthetic"],
        "ssim": analysis["ssim"]["synthetic"],
        "feature_cosine": analysis["feature_cosine"]["synthetic"],
        "effective_rank": analysis["spectrum"]["synthetic"]["effective_rank"],
        "spectrum_slope": analysis["spectrum"]["synthetic"]["decay_slope"],
        "fd_teacher": analysis["fd_teacher"],
        "cov_mean_diagonal": analysis["covariance"]["synthetic"]["mean_diagonal"],
        "cov_offdiag_relative": analysis["covariance"]["synthetic"]["offdiag_relative"],
        "cov_gershgorin_positive_share": analysis["covariance"]["synthetic"]["gershgorin_bound_positive_share"],
        "fid": analysis.get("fid"),
        **{k: v for k, v in analysis.get("robust", {}).items() if k in ("ior", "hlr", "lrs", "ars")},
    }
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not math.isnan(v)}


# Per-sample arrays: analysis.json keeps them, results.json does not.
PER_SAMPLE_KEYS = ("normalized_singular_values",)


def without_arrays(node):
    """A copy of the analysis without its per-sample arrays (PER_SAMPLE_KEYS, at any depth)."""
    if isinstance(node, dict):
        return {k: without_arrays(v) for k, v in node.items() if k not in PER_SAMPLE_KEYS}
    return node
