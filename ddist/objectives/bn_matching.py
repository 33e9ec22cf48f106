"""SRe2L's recover objective: cross-entropy plus BatchNorm statistic matching.

Yin, Xing and Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale
From A New Perspective", NeurIPS 2023, Eq. (7)-(8):

    loss = CE(teacher(x), y) + r_bn * sum_l w_l * ( ||mu_l(x) - running_mean_l||_2
                                                   + ||var_l(x) - running_var_l||_2 )

mu_l(x) and var_l(x) are the statistics of the batch at the *input* of the l-th BatchNorm
layer over (N, H, W), the variance biased (divide by N*H*W, as BatchNorm normalises with);
the norms are plain, not squared; w_l = `first_bn_multiplier` for the first BatchNorm layer
(in module order) and 1 for the others.

`per_group` evaluates G independent batches stacked along the batch dimension in one forward
pass: every statistic and every CE mean is taken per group, so the sum of the G losses has,
for each group's pixels, exactly the gradient that group's own loss has (recover's
`batch.parallel_groups`).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class _GroupMoments(torch.autograd.Function):
    """Per-group, per-channel mean and biased variance of x [G, B, C, H, W] over (B, H, W), [G, C] each.

    Two passes (sum, then the centred squares) and a one-pass backward,
        d/dx = 2 * dvar * (x - mean) / n + dmean / n = x * a + b  (per group and channel; n = B*H*W),
    instead of torch.var_mean: the recover loop takes these moments at every BatchNorm input in every
    iteration, and var_mean's Welford reduction over the non-contiguous (B, H, W) plus its
    several-pass backward were a fifth of an SRe2L iteration on CPU (4x slower here than these passes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims, n = (1, 3, 4), x.shape[1] * x.shape[3] * x.shape[4]
        mean = x.sum(dim=dims) / n
        centred = x - mean[:, None, :, None, None]
        var = centred.square_().sum(dim=dims) / n
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        n = x.shape[1] * x.shape[3] * x.shape[4]
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        a = 2 * grad_var / n
        b = grad_mean / n - a * mean
        return torch.addcmul(b[:, None, :, None, None], x, a[:, None, :, None, None])


def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_moments of each of `groups` equal slices of x [G * B, C, H, W]: mean and var [G, C]."""
    return _GroupMoments.apply(x.unflatten(0, (groups, -1)))


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of feature maps [N, C, H, W] over (N, H, W): [C] each."""
    mean, var = group_moments(x, 1)
    return mean[0], var[0]


def bn_statistic_loss(
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    running: list[tuple[torch.Tensor, torch.Tensor]],
    first_bn_multiplier: float,
) -> torch.Tensor:
    """SRe2L Eq. (8) without r_bn: sum_l w_l (||mu_l - rm_l||_2 + ||var_l - rv_l||_2).

    `moments[l]` are the batch (mean, var) at layer l's input, `running[l]` its
    (running_mean, running_var); w_0 = first_bn_multiplier, w_l = 1 for l > 0.
    Moments [C] give the loss of one batch; moments [G, C] (group_moments) the G groups' losses [G].
    """
    total = moments[0][0].new_zeros(())
    for index, ((mean, var), (running_mean, running_var)) in enumerate(zip(moments, running, strict=False)):
        weight = first_bn_multiplier if index == 0 else 1.0
        total = total + weight * (
            torch.linalg.vector_norm(mean - running_mean, dim=-1) + torch.linalg.vector_norm(var - running_var, dim=-1)
        )
    return total


class BNStatistics:
    """Forward hooks on every nn.BatchNorm2d of a model that record its input's batch moments.

    Registered once at construction and removed by `close()`; `moments` holds the (mean, var)
    of the last forward pass, in module order, and `running` the layers' stored statistics.
    With `groups` > 1 the batch is that many stacked groups and the moments are per group, [G, C].
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(self.layers)  # type: ignore[list-item]
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        self.groups = 1

    def _hook(self, index: int):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            self.moments[index] = batch_moments(x) if self.groups == 1 else group_moments(x, self.groups)

        return record

    @property
    def running(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # BatchNorm2d keeps running statistics unless built with track_running_stats=False, which no model here is
        return [
            (cast(torch.Tensor, layer.running_mean), cast(torch.Tensor, layer.running_var)) for layer in self.layers
        ]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class SRe2LObjective:
    """CE(teacher(x), y) + r_bn * BN statistic loss (SRe2L Eq. 7-8) on a frozen, eval-mode teacher.

    Any batch composition works (SRe2L's reference puts one image per class in each batch);
    the BN term couples all images of the batch, since its statistics are over the batch.
    """

    def __init__(self, teacher: nn.Module, r_bn: float, first_bn_multiplier: float, ce_weight: float = 1.0):
        self.teacher = teacher
        self.r_bn = r_bn
        self.first_bn_multiplier = first_bn_multiplier
        self.ce_weight = ce_weight
        self.bn = BNStatistics(teacher)

    @property
    def num_bn_layers(self) -> int:
        return len(self.bn.layers)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, iteration: int, iterations: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss for one augmented batch and its parts (detached) for logging."""
        logits = self.teacher(images)
        ce = F.cross_entropy(logits, labels)
        bn = bn_statistic_loss(self.bn.moments, self.bn.running, self.first_bn_multiplier)
        loss = self.ce_weight * ce + self.r_bn * bn
        return loss, {"ce": ce.detach(), "bn": bn.detach()}

    def per_group(
        self, images: torch.Tensor, labels: torch.Tensor, groups: int, iteration: int, iterations: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The losses [G] of `groups` equal batches stacked in `images` (group g in rows g*B..(g+1)*B-1),
        from one forward pass, and their parts [G] (detached). Optimise their sum: each group's pixels
        then get the gradient of that group's own loss, as if it ran alone."""
        self.bn.groups = groups
        try:
            logits = self.teacher(images)
        finally:
            self.bn.groups = 1
        ce = F.cross_entropy(logits, labels, reduction="none").unflatten(0, (groups, -1)).mean(dim=1)
        bn = bn_statistic_loss(self.bn.moments, self.bn.running, self.first_bn_multiplier)
        losses = self.ce_weight * ce + self.r_bn * bn
        return losses, {"ce": ce.detach(), "bn": bn.detach()}

    def close(self) -> None:
        self.bn.close()
