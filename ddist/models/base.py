"""The feature API every ddist model shares, and the normalisation layers they choose from."""

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

# model.norm -> a 2-d normalisation layer for `channels` feature maps. "instance" is GroupNorm with
# one group per channel and an affine transform, as the dataset-distillation ConvNet uses it: unlike
# nn.InstanceNorm2d it has learnable per-channel scale and shift by default, and it never keeps running
# statistics, so a student behaves the same in train and eval mode.
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "instance": lambda channels: nn.GroupNorm(channels, channels, affine=True),
    "none": lambda channels: nn.Identity(),
}


def make_norm(kind: str, channels: int) -> nn.Module:
    """NORMS[kind] for `channels` feature maps (callers validate user input first)."""
    return NORMS[kind](channels)


class _SpatialMean(torch.autograd.Function):
    """x [N, C, H, W] -> its mean over (H, W), [N, C]; the gradient comes back in x's memory layout.

    The values are x.mean(dim=(2, 3))'s, both ways. torch's own backward returns an expanded [N, C, 1, 1]
    view, and autograd sums it with the gradient the next layer sends: for a channels_last x the sum came
    out in NCHW, so the backward of every layer below ran its NCHW kernels and converted layouts (a DEDA
    recover iteration, which matches every stage's mean, 1.36x slower on a ConvNet on this CPU).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format  # NCHW where ambiguous
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.shape
        return (grad / (h * w))[:, :, None, None].expand(n, c, h, w).contiguous(memory_format=ctx.layout)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling, [N, C, H, W] -> [N, C]: x.mean(dim=(2, 3)), with its gradient laid out as x."""
    return _SpatialMean.apply(x)


class FeatureModel(nn.Module):
    """A classifier whose trunk exposes per-stage and penultimate features.

    Subclasses set `num_stages`, own the final classifier as `self.fc` (an nn.Linear)
    and implement `_trunk`. `forward` and `forward_features` both run `_trunk` once,
    so the logits they return are identical and the features come from the same pass.
    """

    num_stages: int
    fc: nn.Linear

    def _trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return the stage output maps [N,C,H,W] and the penultimate vector [N,D] fed to `fc`."""
        raise NotImplementedError

    @property
    def feature_names(self) -> list[str]:
        """Keys of the dict `forward_features` returns, shallow to deep."""
        return [f"stage{i}" for i in range(1, self.num_stages + 1)] + ["penultimate"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._trunk(x)[1])

    def features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """The features of `forward_features` without running the classifier head."""
        stages, penultimate = self._trunk(x)
        feats = OrderedDict((f"stage{i}", spatial_mean(s)) for i, s in enumerate(stages, start=1))
        feats["penultimate"] = penultimate
        return feats

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, "OrderedDict[str, torch.Tensor]"]:
        """Logits and an OrderedDict of features: globally average-pooled stage outputs
        ("stage1".."stageK") and "penultimate", the exact input of the final linear layer."""
        feats = self.features(x)
        return self.fc(feats["penultimate"]), feats
