"""A cheaper copy of a frozen, eval-mode model: BatchNorm folded into the conv before it.

In eval mode a BatchNorm2d is a per-channel affine map, y = s * x + t with
s = weight / sqrt(running_var + eps) and t = bias - s * running_mean, so a conv followed by it
equals one conv with weights s * W and bias s * b + t (exact up to float rounding). An
AvgPool2d without padding between the two commutes with the per-channel map, so folding
through it is exact too (ResNetAP's conv -> pool -> norm). The copy has no BatchNorm inputs
left, so it serves every objective except SRe2L's BN statistic matching.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ddist.models.base import FeatureModel

# Modules that may sit between a conv and its BatchNorm without breaking the fold: per-channel
# linear maps with no padding effect (registration order follows the data flow in ddist's models).
_TRANSPARENT = (nn.Identity, nn.AvgPool2d)


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make `conv` compute bn(conv(x)) in eval mode (float64 arithmetic, stored in conv's dtype)."""
    assert bn.running_mean is not None and bn.running_var is not None, "BatchNorm2d without running statistics"
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -scale * bn.running_mean.double()
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)


def _transparent(module: nn.Module) -> bool:
    if isinstance(module, nn.AvgPool2d):
        return module.padding in (0, (0, 0))
    return isinstance(module, _TRANSPARENT)


def fold_batchnorm(model: FeatureModel, channels_last: bool = False) -> FeatureModel:
    """An eval-mode copy of `model` with every foldable BatchNorm2d folded into its conv
    (and replaced by nn.Identity), ReLUs made in-place, weights frozen.

    A BatchNorm2d is foldable when, among its siblings in registration order, the nearest
    earlier module that is not an Identity or unpadded AvgPool2d is a Conv2d of as many output
    channels; any other BatchNorm stays. In-place ReLU is safe for autograd here: after the
    fold every ReLU reads a conv, pooling, GroupNorm or sum output, none of which their backward needs
    (autograd would raise at backward otherwise).
    `channels_last` stores the weights in that layout (oneDNN/cuDNN convolutions then skip layout
    reorders, with or without a gradient to the input). `model` itself is left unchanged.
    """
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    for parent in folded.modules():
        conv: nn.Conv2d | None = None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                conv = child
            elif isinstance(child, nn.BatchNorm2d) and conv is not None and conv.out_channels == child.num_features:
                _fold_into(conv, child)
                setattr(parent, name, nn.Identity())
                conv = None
            elif not _transparent(child):
                conv = None
    for module in folded.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return folded
