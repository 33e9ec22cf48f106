"""SRe2L's BN matching and DEDA's terms against values computed by hand on tiny tensors."""

import logging
import math
from collections import OrderedDict

import pytest
import torch
from conftest import CONF, TRAINED_TEACHER, compose_cfg, stage_ctx
from omegaconf import OmegaConf
from torch import nn

from ddist.data import load_split
from ddist.data.subsets import pick_random_real
from ddist.objectives import (
    REG_NORMALISATIONS,
    ClassMomentSums,
    DEDAObjective,
    DEDAWeights,
    SRe2LObjective,
    batch_moments,
    bn_statistic_loss,
    class_moments,
    covariance_alignment,
    diversity_regulariser,
    mean_alignment,
)
from ddist.objectives.bn_matching import group_moments
from ddist.stages import squeeze
from ddist.training.class_stats import class_stats_layers, real_class_stats
from ddist.training.teacher import load_teacher

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- SRe2L


def bn_input() -> torch.Tensor:
    """[N=2, C=2, H=1, W=2]: channel 0 holds 1, 3, 5, 7 (mean 4, biased var 5); channel 1
    holds 0, 0, 2, 2 (mean 1, biased var 1)."""
    return torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])


def test_batch_moments_are_per_channel_and_biased():
    mean, var = batch_moments(bn_input())
    assert torch.equal(mean, torch.tensor([4.0, 1.0]))
    assert torch.equal(var, torch.tensor([5.0, 1.0]))


def test_batch_moments_gradient_by_hand():
    """d var_c / dx = 2 (x - mean_c) / n and d mean_c / dx = 1 / n (n = N*H*W = 4), per channel."""
    x = bn_input().requires_grad_(True)
    mean, var = batch_moments(x)
    (var[0] + 10 * mean[1]).backward()
    want = torch.tensor([[[[-1.5, -0.5]], [[2.5, 2.5]]], [[[0.5, 1.5]], [[2.5, 2.5]]]])
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_moments_match_autograd_through_var_mean(groups, channels_last):
    """The hand-written pass and backward equal torch.var_mean's, in either memory layout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_mean, w_var = torch.randn(2, groups, 4, generator=g, dtype=torch.float64)
    grads = []
    for moments in (group_moments, reference_group_moments):
        xi = x.clone().requires_grad_(True)
        mean, var = moments(xi, groups)
        ((w_mean * mean).sum() + (w_var * var).sum()).backward()
        grads.append((mean.detach(), var.detach(), xi.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def reference_group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.unflatten(0, (groups, -1)), dim=(1, 3, 4), unbiased=False)
    return mean, var


def test_bn_statistic_loss_plain_norms_and_first_layer_weight():
    # layer 0: ||(4,1)-(1,1)|| + ||(5,1)-(1,1)|| = 3 + 4 = 7, weight 10
    # layer 1: ||(3,4)-(0,0)|| + ||(2,2)-(2,2)|| = 5 + 0 = 5, weight 1
    moments = [
        (torch.tensor([4.0, 1.0]), torch.tensor([5.0, 1.0])),
        (torch.tensor([3.0, 4.0]), torch.tensor([2.0, 2.0])),
    ]
    running = [(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])), (torch.zeros(2), torch.tensor([2.0, 2.0]))]
    assert bn_statistic_loss(moments, running, first_bn_multiplier=10.0).item() == pytest.approx(75.0)
    assert bn_statistic_loss(moments, running, first_bn_multiplier=1.0).item() == pytest.approx(12.0)


def test_sre2l_objective_hooks_the_bn_input_and_adds_ce():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(1.0)
    head = nn.Linear(4, 2)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    teacher = nn.Sequential(bn, nn.Flatten(), head).eval()
    objective = SRe2LObjective(teacher, r_bn=0.01, first_bn_multiplier=10.0)
    loss, parts = objective(bn_input(), torch.tensor([0, 1]), 0, 1)
    # zero logits: CE = log 2; BN term of the *input* (not the normalised output) = 7, x10
    assert parts["ce"].item() == pytest.approx(LOG2)
    assert parts["bn"].item() == pytest.approx(70.0)
    assert loss.item() == pytest.approx(LOG2 + 0.7)
    objective.close()
    assert not bn._forward_hooks


# ----------------------------------------------------------------------------- DEDA terms


def two_classes() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: (1,0), (3,2) -> mean (2,1), cov [[1,1],[1,1]];
    class 1: (0,0), (0,4) -> mean (0,2), cov [[0,0],[0,4]]."""
    feats = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    return feats, torch.tensor([0, 1, 0, 1])


def test_class_moments_by_hand():
    feats, labels = two_classes()
    mean, cov = class_moments(feats, labels, torch.tensor([0, 1]))
    assert torch.equal(mean, torch.tensor([[2.0, 1.0], [0.0, 2.0]]))
    assert torch.equal(cov, torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 4.0]]]))


def test_alignment_terms_by_hand():
    feats, labels = two_classes()
    mean, cov = class_moments(feats, labels, torch.tensor([0, 1]))
    # ||(2,1)||^2 = 5, ||(0,2)||^2 = 4
    assert mean_alignment(mean, torch.zeros(2, 2)).tolist() == [5.0, 4.0]
    # against I: [[0,1],[1,0]] -> 2 / d=2; [[-1,0],[0,3]] -> 10 / 2
    assert covariance_alignment(cov, torch.eye(2).expand(2, 2, 2)).tolist() == [1.0, 5.0]


def test_diversity_regulariser_by_hand():
    _, cov = class_moments(*two_classes(), torch.tensor([0, 1]))
    # class 0: -0.5 * mean(1, 1) + 2 * (1 + 1) = 3.5; class 1: -0.5 * mean(0, 4) + 0 = -1
    assert diversity_regulariser(cov, 0.5, 2.0, "mean_sum").tolist() == [3.5, -1.0]


@pytest.mark.parametrize(
    ("normalisation", "expected"),
    [
        ("mean_sum", -0.5 * 2 + 3 * 4),  # mean diag 2, sum of squared off-diagonals 4
        ("mean_mean", -0.5 * 2 + 3 * 4 / 6),  # d(d-1) = 6 off-diagonal entries
        ("sum_sum", -0.5 * 6 + 3 * 4),  # trace 6
        ("mean_rel", -0.5 * 2 + 3 * 4 / 6 / 4),  # mean squared off-diagonal / mean diag^2
        ("sum_rel", -0.5 * 6 + 3 * 4 / 6 / 4),
    ],
)
def test_diversity_regulariser_normalisations_by_hand(normalisation, expected):
    # diag (1, 2, 3): mean 2, sum 6; off-diagonal 1, 0, -1 (each twice): squares sum to 4
    cov = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 2.0, -1.0], [0.0, -1.0, 3.0]]])
    assert diversity_regulariser(cov, 0.5, 3.0, normalisation).item() == pytest.approx(expected)


def test_correlation_regulariser_by_hand():
    cov = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 2.0, -1.0], [0.0, -1.0, 3.0]]])
    # D: variances over the real ones (2, 2, 6) -> mean(0.5, 1, 0.5) = 2/3
    # O: Corr_01 = 1 / sqrt(2), Corr_12 = -1 / sqrt(6), Corr_02 = 0 -> 2 (1/2 + 1/6) / 6 = 2/9
    value = diversity_regulariser(cov, 0.5, 3.0, "ratio_corr", torch.tensor([[2.0, 2.0, 6.0]]))
    assert value.item() == pytest.approx(-0.5 * 2 / 3 + 3 * 2 / 9)
    # a unit the real class never varies is left out of D: mean(0.5, 0.5) over the other two
    value = diversity_regulariser(cov, 0.5, 0.0, "ratio_corr", torch.tensor([[2.0, 0.0, 6.0]]))
    assert value.item() == pytest.approx(-0.5 * 0.5)
    with pytest.raises(ValueError, match="ref_var"):
        diversity_regulariser(cov, 0.5, 3.0, "ratio_corr")


def test_correlation_term_ignores_per_feature_scale():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(12, 1, generator=g) + torch.randn(12, 5, generator=g)
    cov = class_moments(f, torch.zeros(12, dtype=torch.long), torch.tensor([0]))[1]
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0])
    scaled = cov * scale[:, None] * scale[None, :]
    ones = torch.ones(1, 5)
    assert diversity_regulariser(scaled, 0.0, 1.0, "ratio_corr", ones).item() == pytest.approx(
        diversity_regulariser(cov, 0.0, 1.0, "ratio_corr", ones).item()
    )
    # rel is invariant to one global scale only
    assert diversity_regulariser(scaled, 0.0, 1.0, "sum_rel").item() != pytest.approx(
        diversity_regulariser(cov, 0.0, 1.0, "sum_rel").item()
    )


@pytest.mark.parametrize("normalisation", ["sum_rel", "ratio_corr"])
def test_relative_regulariser_of_a_collapsed_class_is_zero_not_nan(normalisation):
    cov = torch.zeros(1, 3, 3, requires_grad=True)
    value = diversity_regulariser(cov, 0.2, 4.0, normalisation, torch.ones(1, 3))
    value.sum().backward()
    assert value.item() == 0.0 and torch.isfinite(cov.grad).all()


class FeatureTeacher(nn.Module):
    """A stand-in teacher: images [N, 2, 1, 1] are the stage1 features, stage2 is twice them;
    logits are zero (CE = log 2) but stay connected to the input."""

    feature_names = ("stage1", "stage2", "penultimate")

    def features(self, x):
        f = x.flatten(1)
        return OrderedDict(stage1=f, stage2=2 * f, penultimate=2 * f)

    def forward_features(self, x):
        return x.flatten(1) * 0.0, self.features(x)


def deda(layers, ipc=2, **kw):
    real = {k: (torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2)) for k in layers}
    opts = {
        "mean_weight": 1.0,
        "gamma": 1.0,
        "gamma_scope": "cov",
        "lambda_diag": 0.5,
        "lambda_offdiag": 2.0,
        "reg_iterations": 5,
        "reg_normalisation": "mean_sum",
    }
    return DEDAObjective(FeatureTeacher(), real, ipc, DEDAWeights(**{**opts, **kw}))


def test_deda_objective_by_hand():
    feats, labels = two_classes()
    images = feats[:, :, None, None]
    objective = deda(["stage1"])
    # before the last 5 of 10 iterations: per class (5 + 1, 4 + 5), mean over classes 7.5
    loss, parts = objective(images, labels, 4, 10)
    assert loss.item() == pytest.approx(LOG2 + 7.5)
    assert parts["reg"].item() == 0.0
    # regulariser on: (6 + 3.5, 9 - 1) -> mean 8.75; sum over classes 17.5
    assert objective(images, labels, 5, 10)[0].item() == pytest.approx(LOG2 + 8.75)
    summed = deda(["stage1"], class_reduction="sum")
    assert summed(images, labels, 5, 10)[0].item() == pytest.approx(LOG2 + 17.5)
    # gamma_scope=mean_and_cov: gamma weighs both alignment terms, (2 (5 + 1), 2 (4 + 5)) -> mean 15
    scoped = deda(["stage1"], gamma=2.0, gamma_scope="mean_and_cov")
    assert scoped(images, labels, 4, 10)[0].item() == pytest.approx(LOG2 + 15.0)
    assert deda(["stage1"], gamma=2.0)(images, labels, 4, 10)[0].item() == pytest.approx(LOG2 + 10.5)


def test_deda_regulariser_acts_on_the_last_layer():
    feats, labels = two_classes()
    objective = deda(["stage1", "stage2"], mean_weight=0.0, gamma=0.0)
    # stage2 = 2 x: cov x4 -> class 0: -0.5 * 4 + 2 * 32 = 62; class 1: -0.5 * 8 = -4; mean 29
    loss, _ = objective(feats[:, :, None, None], labels, 9, 10)
    assert loss.item() == pytest.approx(LOG2 + 29.0)


def regulariser_step(
    feats: torch.Tensor,
    labels: torch.Tensor,
    lambda_diag: float,
    lambda_offdiag: float,
    normalisation: str,
    step: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class covariances before and after one gradient step of the regulariser alone on the
    features, each class moved by `step` x its centred feature norm (the normalisations differ
    by orders of magnitude in gradient size; the direction decides the effect)."""
    classes = labels.unique()
    feats = feats.clone().requires_grad_(True)
    cov = class_moments(feats, labels, classes)[1]
    # the features' own variances stand in for the real class's (ratio_corr's unit)
    ref_var = cov.detach().diagonal(dim1=-2, dim2=-1)
    diversity_regulariser(cov, lambda_diag, lambda_offdiag, normalisation, ref_var).sum().backward()
    with torch.no_grad():
        onehot = (labels[:, None] == classes[None, :]).to(feats.dtype)
        centred = feats - onehot @ (onehot.T @ feats / onehot.sum(0)[:, None])

        def norm(t):
            return (onehot * t.pow(2).sum(1, keepdim=True)).sum(0).sqrt()

        scale = onehot @ (step * norm(centred) / norm(feats.grad))
        after = class_moments(feats - scale[:, None] * feats.grad, labels, classes)[1]
    return cov.detach(), after


def diag_and_offdiag(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: mean(diag Cov) and ||Cov - Diag(Cov)||_F."""
    diag = cov.diagonal(dim1=-2, dim2=-1)
    return diag.mean(-1), (cov - torch.diag_embed(diag)).flatten(1).norm(dim=-1)


@pytest.mark.parametrize("normalisation", REG_NORMALISATIONS)
def test_each_regulariser_term_alone_does_its_part(normalisation):
    g = torch.Generator().manual_seed(0)
    correlated = torch.randn(8, 1, generator=g) + 0.5 * torch.randn(8, 4, generator=g)
    labels = torch.zeros(8, dtype=torch.long)
    before, after = regulariser_step(correlated, labels, 0.2, 0.0, normalisation)
    assert bool((after.diagonal(dim1=-2, dim2=-1) > before.diagonal(dim1=-2, dim2=-1)).all())
    before, after = regulariser_step(correlated, labels, 0.0, 4.0, normalisation)
    assert diag_and_offdiag(after)[1] < diag_and_offdiag(before)[1]


def config_weights() -> list[tuple[float, float]]:
    """The distinct (lambda1, lambda2) of the configs: digits' default and the paper cells
    (CIFAR/Tiny-ImageNet 0.2, 4.0; ImageNet-1K 0.01, 0.25)."""
    nodes = [
        OmegaConf.load(CONF / "recover/deda.yaml").deda,
        OmegaConf.load(CONF / "experiment/deda/cifar10_ipc10.yaml").recover.deda,
        OmegaConf.load(CONF / "experiment/deda/tiny_imagenet_ipc50.yaml").recover.deda,
        OmegaConf.load(CONF / "experiment/deda/imagenet1k_ipc10.yaml").recover.deda,
    ]
    return sorted({(float(n.lambda_diag), float(n.lambda_offdiag)) for n in nodes})


# the paper's two teacher families on digits: the ConvNet-3 (L = its pooled last block, d = 16 here) and the
# ResNet-18 of the paper cells (L = the classifier input, d = 512)
TEACHERS = {
    "convnet": TRAINED_TEACHER,
    "resnet18": ["model@teacher.model=resnet18", "teacher.epochs=2"],
}


@pytest.fixture(scope="module", params=[pytest.param("convnet"), pytest.param("resnet18", marks=pytest.mark.slow)])
def teacher_features(request, trained_digits_teacher, cache_dir, tmp_path_factory):
    """DEDA's final-layer features L of 10 real train images per class through a trained digits
    teacher of each architecture (post-ReLU, correlated), the labels, and the default normalisation."""
    run_dir = tmp_path_factory.mktemp("features")
    cfg = compose_cfg(*TEACHERS[request.param], "pipeline=deda", cache_dir=cache_dir, run_dir=run_dir)
    ctx = stage_ctx(cfg, run_dir)
    teacher = load_teacher(cfg, squeeze.run(cfg, ctx))
    train = load_split(cfg.dataset, "train", cache_dir)
    idx = pick_random_real(train, 10, 10, seed=0)
    with torch.no_grad():
        feats = teacher.forward_features(torch.stack([train[int(i)][0] for i in idx]))[1]
    return (
        feats[class_stats_layers(cfg, teacher.feature_names)[-1]],
        train.targets[idx],
        cfg.recover.deda.reg_normalisation,
    )


@pytest.mark.parametrize(("lambda_diag", "lambda_offdiag"), config_weights())
def test_default_regulariser_spreads_and_decorrelates_teacher_features(teacher_features, lambda_diag, lambda_offdiag):
    feats, labels, default = teacher_features
    assert float(feats.min()) >= 0.0  # post-ReLU, pooled
    before, after = regulariser_step(feats, labels, lambda_diag, lambda_offdiag, default)
    (d0, o0), (d1, o1) = diag_and_offdiag(before), diag_and_offdiag(after)
    assert float(o0.min()) > float(d0.max())  # correlated: the off-diagonal is far from 0
    # the configured reading raises the mean variance and lowers the off-diagonal norm at once,
    # in every class and on both architectures; sum_rel (the default before) raises the
    # off-diagonal norm with the variances at d = 512, and mean_sum lowers the variances
    assert bool((d1 > d0).all()) and bool((o1 < o0).all())
    before, after = regulariser_step(feats, labels, lambda_diag, lambda_offdiag, "mean_sum")
    assert bool((diag_and_offdiag(after)[0] < diag_and_offdiag(before)[0]).all())


def test_ipc1_skips_covariance_terms(caplog):
    """The objective skips them silently; ddist.config.checks warns once (tests/test_bad_inputs.py)."""
    feats = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 1])
    with caplog.at_level(logging.WARNING, logger="ddist"):
        objective = deda(["stage1"], ipc=1)
        losses = [objective(feats[:, :, None, None], labels, it, 10)[0].item() for it in range(10)]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # mean terms only: (1 + 16) / 2, regulariser never on
    assert losses == pytest.approx([LOG2 + 8.5] * 10)


# ----------------------------------------------------------------------------- batched statistics


def loop_moments(feats, labels, num_classes):
    means = torch.stack([feats[labels == c].mean(0) for c in range(num_classes)])
    covs = torch.stack([torch.cov(feats[labels == c].T, correction=0) for c in range(num_classes)])
    return means, covs


def test_batched_class_statistics_equal_a_per_class_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 5, generator=g)
    labels = torch.arange(4).repeat(15)[torch.randperm(60, generator=g)]
    want_mean, want_cov = loop_moments(feats, labels, 4)
    mean, cov = class_moments(feats, labels, torch.arange(4))
    torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(cov, want_cov, atol=1e-6, rtol=0)

    # streamed over uneven batches (some with one class only) through ClassMomentSums
    sums = ClassMomentSums(4, {"f": 5})
    order = torch.sort(labels, stable=True).indices
    for chunk in torch.tensor_split(order, [7, 9, 30, 31]):
        sums.update({"f": feats[chunk]}, labels[chunk])
    mean, cov = sums.moments()["f"]
    torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(cov, want_cov, atol=1e-6, rtol=0)


def test_real_class_stats_through_a_teacher():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(40, 2, 1, 1, generator=g)
    labels = torch.arange(2).repeat(20)
    batches = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 40, 16)]
    stats = real_class_stats(FeatureTeacher(), batches, 2, ["stage1", "stage2"], torch.device("cpu"))
    want_mean, want_cov = loop_moments(images.flatten(1), labels, 2)
    torch.testing.assert_close(stats["stage1"][0], want_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["stage2"][1], 4 * want_cov, atol=1e-6, rtol=0)
