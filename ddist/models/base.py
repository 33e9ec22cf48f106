"""The feature API every ddist model shares, and the normalisation layers they choose from."""

from collections import OrderedDict

import torch
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2-d normalisation layer for `channels` feature maps.

    "instance" is GroupNorm with one group per channel and an affine transform, as the
    dataset-distillation ConvNet uses it: unlike nn.InstanceNorm2d it has learnable
    per-channel scale and shift by default, and it never keeps running statistics, so a
    student behaves the same in train and eval mode.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")  # the model schemas (ddist/config.py) admit no other


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

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, "OrderedDict[str, torch.Tensor]"]:
        """Logits and an OrderedDict of features: globally average-pooled stage outputs
        ("stage1".."stageK") and "penultimate", the exact input of the final linear layer."""
        stages, penultimate = self._trunk(x)
        feats = OrderedDict((f"stage{i}", s.mean(dim=(2, 3))) for i, s in enumerate(stages, start=1))
        feats["penultimate"] = penultimate
        return self.fc(penultimate), feats
