"""ResNetAP-10: the average-pooling ResNet-10 that IDC and MiniMax evaluate students with."""

import torch
from torch import nn

from ddist.models.base import FeatureModel, make_norm, spatial_mean

WIDTHS = (64, 128, 256, 512)


class APBlock(nn.Module):
    """A ResNet BasicBlock that downsamples by AvgPool2d(2) after a stride-1 conv
    instead of by a stride-2 conv; the shortcut pools too, then projects with a 1x1 conv
    (pooling first is exact, since a 1x1 conv and average pooling commute, and 4x cheaper)."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.bn1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.bn2 = make_norm(norm, out_ch)
        self.relu = nn.ReLU()
        if downsample or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.AvgPool2d(2) if downsample else nn.Identity(),
                nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False),
                make_norm(norm, out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.pool(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetAP10(FeatureModel):
    """Stem, four stages of one APBlock each (64, 128, 256, 512 channels; stages 2-4 halve
    the map), global average pooling, Linear.

    stem="cifar": conv3x3 stride 1 -> norm -> ReLU (no downsampling).
    stem="imagenet": conv7x7 stride 2 -> norm -> ReLU -> AvgPool2d(2), a 4x reduction like
    torchvision's stem with its max-pool replaced by average pooling. The stride-2 conv is
    kept on purpose: a stride-1 conv at 224px would hold 4x larger activations in the
    stem, the memory peak of training at that size.
    """

    num_stages = 4

    def __init__(self, num_classes: int, channels: int, stem: str, norm: str):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(channels, WIDTHS[0], kernel_size=3, padding=1, bias=False),
                make_norm(norm, WIDTHS[0]),
                nn.ReLU(),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, WIDTHS[0], kernel_size=7, stride=2, padding=3, bias=False),
                make_norm(norm, WIDTHS[0]),
                nn.ReLU(),
                nn.AvgPool2d(2),
            )
        in_widths = (WIDTHS[0], *WIDTHS[:-1])
        self.layers = nn.ModuleList(
            APBlock(i, o, downsample=k > 0, norm=norm) for k, (i, o) in enumerate(zip(in_widths, WIDTHS, strict=False))
        )
        self.fc = nn.Linear(WIDTHS[-1], num_classes)

    def _trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.stem(x)
        stages = []
        for layer in self.layers:
            x = layer(x)
            stages.append(x)
        return stages, spatial_mean(x)


def min_resolution(stem: str) -> int:
    """Smallest input size whose map survives the stem and three halvings (at least 1x1)."""
    return 8 if stem == "cifar" else 32
