"""DEDA's recover objective: per-class Gaussian alignment of teacher features plus a
covariance regulariser that spreads the final-layer features.

Li, Zhou, Gu, Li and Wang, "Diversity-Enhanced Distribution Alignment for Dataset
Distillation", ICCV 2025. For each class c and each selected feature stage l (globally
average-pooled features of the teacher, `FeatureModel.forward_features`):

    align_c   = sum_l  mean_weight * ||mu_S,c^l - mu_R,c^l||_2^2
                     + gamma * ||Cov_S,c^l - Cov_R,c^l||_F^2 / d_l       (main paper: mean and
                                                                          covariance alignment)
                (gamma_scope = mean_and_cov: gamma * (both terms) instead)
    reg_c     = - lambda_diag * D(diag(Cov_S,c^L))                       (supplement, Eq. 11)
                + lambda_offdiag * O(Cov_S,c^L - Diag(Cov_S,c^L))        (supplement, Eq. 12)
    loss      = ce_weight * CE(teacher(x), y) + reduce_c (align_c + [reg_c])

Cov is the class covariance (the supplement's Eq. 10 for Cov_S,c^L). D and O reduce the
diagonal and the squared off-diagonal entries, as `reg_normalisation` says (see
diversity_regulariser). Where the public text is silent, each choice is an option:
- reading: the biased estimator (1/n) sum (f - mu)(f - mu)^T for the synthetic (S) and the
  real (R) class alike, so both sides are the same function of their samples;
- reading: `mean_weight` = 1, as no weight of the mean term is given;
- reading: `gamma_scope` = cov: the seed lists gamma (50 / 50 / 1.0) without defining it; it is
  read as the covariance term's weight (the mean term has its own, mean_weight), and
  `mean_and_cov` makes it weigh the whole alignment instead;
- reading: the covariance term divided by d_l, so layers of different widths weigh alike;
- reading: `layers` = every pooled stage of the teacher by default, none privileged;
- reading: the regulariser only in the last `reg_iterations` iterations (half, in the
  configs), so the images first match the real class statistics and are then spread;
- reading: `class_reduction` = mean over the classes in the batch: with CE averaged over the
  batch this gives each class's images the same loss as optimising that class alone, up to a
  constant factor.

reading: L, the "final layer" of the regulariser, is the last of the aligned layers, by
default the pooled last block ("stageK"), not the classifier's input ("penultimate"). They
are the same vector for the paper's ResNet teachers (the last block is globally pooled into
the classifier); for the ConvNet the classifier reads the flattened last map (C x H x W:
512 features on 16px digits, 2048 on CIFAR), whose covariance mostly relates the same channel
at different positions, which recover's random shifts (roll) keep changing, and which the
alignment terms (all on pooled features) never see. Pooled keeps Cov^L the covariance of the
same features the alignment acts on, as the notation Cov_S,c^l / Cov_S,c^L says.
`recover.deda.layers=[..., penultimate]` makes L the classifier input instead.

A class with one synthetic image has no covariance: with IPC = 1 the covariance terms
(gamma and the regulariser) are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddist.models.base import FeatureModel

# the choices of recover.deda.class_reduction, .reg_normalisation and .gamma_scope, as plain strings; the
# schema's Literals (ddist/config/schema.py) list the same (tests/test_schemas.py checks they agree)
CLASS_REDUCTIONS: tuple[str, ...] = ("mean", "sum")
REG_NORMALISATIONS: tuple[str, ...] = ("mean_sum", "mean_mean", "sum_sum", "mean_rel", "sum_rel", "ratio_corr")
GAMMA_SCOPES: tuple[str, ...] = ("cov", "mean_and_cov")


# ----------------------------------------------------------------------------- class statistics


def class_moments(
    features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean [K, d] and biased covariance [K, d, d] of `features` [N, d].

    One batched reduction through a one-hot matrix [N, K] (K = len(classes)), no loop
    over classes; differentiable, so it serves the synthetic side of the loss.
    """
    onehot = (labels[:, None] == classes[None, :]).to(features.dtype)
    counts = onehot.sum(dim=0)
    mean = onehot.T @ features / counts[:, None]
    centered = features - onehot @ mean
    cov = torch.einsum("nk,ni,nj->kij", onehot, centered, centered) / counts[:, None, None]
    return mean, cov


class ClassMomentSums:
    """Running per-class sums of f and f f^T (float64) over a stream of labelled batches.

    `update` adds one batch with an index_add of one-hot matrix products over the classes
    present in it; `moments` returns each class's mean and biased covariance
    E[f f^T] - mu mu^T. Used once, over the real train split, for mu_R and Cov_R.
    """

    def __init__(self, num_classes: int, dims: Mapping[str, int], device: torch.device | str = "cpu"):
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.sums = {k: torch.zeros(num_classes, d, dtype=torch.float64, device=device) for k, d in dims.items()}
        self.outer = {k: torch.zeros(num_classes, d, d, dtype=torch.float64, device=device) for k, d in dims.items()}

    @torch.no_grad()
    def update(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        present, inverse = labels.unique(return_inverse=True)
        onehot = F.one_hot(inverse, len(present)).to(torch.float64)
        self.counts.index_add_(0, present, onehot.sum(dim=0))
        for key in self.sums:
            f = features[key].to(torch.float64)
            self.sums[key].index_add_(0, present, onehot.T @ f)
            self.outer[key].index_add_(0, present, torch.einsum("nk,ni,nj->kij", onehot, f, f))

    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (mean [C, d], cov [C, d, d])} in float32; classes never seen are an error."""
        if bool((self.counts == 0).any()):
            missing = (self.counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"no real samples for classes {missing[:10]}")
        n = self.counts[:, None]
        out = {}
        for key in self.sums:
            mean = self.sums[key] / n
            cov = self.outer[key] / n[..., None] - mean[:, :, None] * mean[:, None, :]
            out[key] = (mean.float(), cov.float())
        return out


# ----------------------------------------------------------------------------- the terms


def mean_alignment(mean_s: torch.Tensor, mean_r: torch.Tensor) -> torch.Tensor:
    """||mu_S,c - mu_R,c||_2^2 per class: [K, d] x [K, d] -> [K] (the main paper's mean alignment)."""
    return (mean_s - mean_r).pow(2).sum(dim=-1)


def covariance_alignment(cov_s: torch.Tensor, cov_r: torch.Tensor) -> torch.Tensor:
    """||Cov_S,c - Cov_R,c||_F^2 / d per class: [K, d, d] x [K, d, d] -> [K] (the main paper's
    covariance alignment; reading: the 1/d keeps layers of different widths comparable)."""
    return (cov_s - cov_r).pow(2).sum(dim=(-2, -1)) / cov_s.shape[-1]


def diversity_regulariser(
    cov: torch.Tensor,
    lambda_diag: float,
    lambda_offdiag: float,
    normalisation: str,
    ref_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """-lambda_diag * D(diag Cov_c) + lambda_offdiag * O(Cov_c - Diag(Cov_c)) per class:
    [K, d, d] -> [K]. The supplement maximises the diagonal of Cov_S,c^L (its Eq. 11) and
    minimises ||Cov_S,c^L - Diag(Cov_S,c^L)||_F^2 (its Eq. 12) "to decouple feature
    correlations", without saying how either is reduced over its entries, and that choice sets
    their balance: the diagonal has d entries, the off-diagonal d(d-1). `normalisation` =
    "<D>_<O>" (REG_NORMALISATIONS):

        D  mean:  mean of the d diagonal entries     sum: their sum (the trace)
           ratio: mean_i Var_S,i / Var_R,i, each variance in units of the real class's
                  (ref_var [K, d], the diagonal of Cov_R,c^L): dimensionless
        O  sum:   sum of the d(d-1) squared others (||.||_F^2, Eq. 12 as written)
           mean:  mean of the squared others
           rel:   mean of the squared others over the squared mean variance,
                  mean_{i != j} (Cov_ij / mean(diag Cov))^2
           corr:  mean of the squared off-diagonal correlations, mean_{i != j} Corr_ij^2,
                  Corr = D^-1/2 Cov D^-1/2 (D = Diag(Cov))

    mean_sum is what the regulariser was first; mean_mean and sum_sum are the other two
    count normalisations. Under them the two terms scale differently with the features
    (O quartic, D quadratic), so at fixed weights their balance depends on the teacher's
    feature scale, and on realistic (correlated, post-ReLU) features the gradients of D and O
    are nearly parallel: both mostly rescale the features, so the sum either shrinks every
    variance with the correlations (mean_sum, sum_sum) or inflates the correlations with the
    variances (mean_mean).

    reading (rel): the off-diagonal in units of the mean variance, unchanged by one global
    rescaling of the features, so its gradient leaves the variance to D. With D = the trace
    (sum_rel) the diagonal term is d times the mean's: at d = 512 (the ResNet-18 teacher) it
    swamps O, and the features are mostly scaled up, the off-diagonal norm with them (a step on
    real ResNet-18 features: mean variance .132 -> .135, off-diagonal norm 27.9 -> 28.4, 0/10
    classes with both effects). With D = the mean (mean_rel, the default) the balance does not
    depend on d: the same step gives .1321 -> .1322 and 27.9 -> 27.6 (10/10).

    reading (ratio_corr): "decouple feature correlations" read as the correlations themselves.
    Corr is unchanged by any per-feature rescaling, so O's gradient only decorrelates; D is the
    diagonal in the same (dimensionless) units, each feature's variance relative to the real
    class's at L, so lambda1 and lambda2 weigh numbers of order 1 on any teacher.

    The rel and corr readings depart from Eq. 11/12's literal entries by a data-dependent unit.
    The default (conf/recover/deda.yaml) is the reading that, in whole recovers against the same
    run with lambda1 = lambda2 = 0, raised the mean variance and lowered the off-diagonal norm in
    the most (architecture, dataset, weight pair) cells; the table is in
    scripts/measure_deda_regulariser.py's docstring and the README. No reading does both on the
    ResNet-18 teacher in whole recovers at the paper's weights: there the alignment terms
    dominate and every reading moves the figures by a few percent.
    """
    if normalisation not in REG_NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {REG_NORMALISATIONS}")
    diag_norm, off_norm = normalisation.split("_")
    diag = cov.diagonal(dim1=-2, dim2=-1)
    d = cov.shape[-1]
    pairs = max(d * (d - 1), 1)
    if diag_norm == "ratio":
        if ref_var is None:
            raise ValueError(f"normalisation {normalisation} needs the real class variances (ref_var)")
        # a real feature that never varies (a dead unit) has no unit: it is left out of the mean
        alive = ref_var > 0
        diag_term = torch.where(alive, diag / ref_var.clamp_min(1e-30), 0).sum(-1) / alive.sum(-1).clamp_min(1)
    else:
        diag_term = diag.mean(dim=-1) if diag_norm == "mean" else diag.sum(dim=-1)
    if off_norm == "corr":
        # the floor keeps a feature that does not vary at 0 correlation with finite gradients
        inv_std = diag.clamp_min(1e-12).rsqrt()
        corr = cov * inv_std[..., :, None] * inv_std[..., None, :]
        off_term = (corr - torch.diag_embed(corr.diagonal(dim1=-2, dim2=-1))).pow(2).sum(dim=(-2, -1)) / pairs
    else:
        off_sq = (cov - torch.diag_embed(diag)).pow(2).sum(dim=(-2, -1))
        off_term = off_sq if off_norm == "sum" else off_sq / pairs
        if off_norm == "rel":
            # a class with all features equal has 0 / 0 here: the floor makes it 0 with finite
            # gradients (its square, in the gradient, must not underflow float32)
            off_term = off_term / diag.mean(dim=-1).pow(2).clamp_min(1e-12)
    return -lambda_diag * diag_term + lambda_offdiag * off_term


# ----------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class DEDAWeights:
    """The weights and readings of the DEDA loss (recover.deda.* and recover.ce_weight)."""

    mean_weight: float
    gamma: float
    gamma_scope: str
    lambda_diag: float
    lambda_offdiag: float
    reg_iterations: int
    reg_normalisation: str
    class_reduction: str = "mean"
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("class_reduction", self.class_reduction, CLASS_REDUCTIONS),
            ("reg_normalisation", self.reg_normalisation, REG_NORMALISATIONS),
            ("gamma_scope", self.gamma_scope, GAMMA_SCOPES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}")


class DEDAObjective:
    """The DEDA loss on a frozen, eval-mode teacher, given the real class statistics.

    real_stats: {layer: (mean [C, d], cov [C, d, d])} for every class, in teacher feature
    order; the last layer is the one the regulariser acts on. Every class in a batch must
    have all its `ipc` images in it (the statistics are per class).
    """

    def __init__(
        self,
        teacher: FeatureModel,
        real_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        ipc: int,
        weights: DEDAWeights,
    ):
        self.teacher = teacher
        self.real_stats = dict(real_stats)
        self.layers = list(self.real_stats)
        self.w = weights
        self.use_covariance = ipc > 1  # with IPC = 1 ddist.config.checks warns that these terms are skipped

    def regularising(self, iteration: int, iterations: int) -> bool:
        """The regulariser is on in the last `reg_iterations` of `iterations` (0-based index)."""
        return self.use_covariance and iteration >= iterations - self.w.reg_iterations

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, iteration: int, iterations: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss for one augmented batch of whole classes and its parts (detached)."""
        logits, feats = self.teacher.forward_features(images)
        ce = F.cross_entropy(logits, labels)
        classes = labels.unique()
        mean_term = logits.new_zeros(len(classes))
        cov_term = logits.new_zeros(len(classes))
        reg_term = logits.new_zeros(len(classes))
        for layer in self.layers:
            mean_s, cov_s = class_moments(feats[layer], labels, classes)
            mean_r, cov_r = (t[classes] for t in self.real_stats[layer])
            mean_term = mean_term + mean_alignment(mean_s, mean_r)
            if self.use_covariance:
                cov_term = cov_term + covariance_alignment(cov_s, cov_r)
        if self.regularising(iteration, iterations):
            # cov_s, cov_r are now the covariances of the last layer, L (by default the pooled last block)
            reg_term = diversity_regulariser(
                cov_s,
                self.w.lambda_diag,
                self.w.lambda_offdiag,
                self.w.reg_normalisation,
                cov_r.diagonal(dim1=-2, dim2=-1),
            )
        reduce = torch.mean if self.w.class_reduction == "mean" else torch.sum
        if self.w.gamma_scope == "cov":
            per_class = self.w.mean_weight * mean_term + self.w.gamma * cov_term + reg_term
        else:
            per_class = self.w.gamma * (self.w.mean_weight * mean_term + cov_term) + reg_term
        loss = self.w.ce_weight * ce + reduce(per_class)
        parts = {"ce": ce, "mean": reduce(mean_term), "cov": reduce(cov_term), "reg": reduce(reg_term)}
        return loss, {k: v.detach() for k, v in parts.items()}

    def close(self) -> None:
        """Nothing to release (no hooks); the recover loop calls it on every objective."""
