"""The ConvNet of the dataset-distillation literature (DC, DM, MTT, MiniMax's ConvNet-6)."""

import torch
from torch import nn

from ddist.models.base import FeatureModel, make_norm


class ConvNet(FeatureModel):
    """`depth` blocks of conv3x3 -> norm -> ReLU -> AvgPool2d(2), then flatten -> Linear.

    The flattened last block output is the penultimate feature. A block whose input map is
    already 1x1 skips its pooling, so any depth works at any resolution (e.g. depth 6 on
    16px images: 16 -> 8 -> 4 -> 2 -> 1 -> 1 -> 1).
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        resolution: int,
        depth: int,
        width: int,
        norm: str,
    ):  # the defaults: conf/model/convnet.yaml (build_model fills them in)
        super().__init__()
        self.num_stages = depth
        blocks, in_ch, size = [], channels, resolution
        for _ in range(depth):
            pool = size >= 2
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, width, kernel_size=3, padding=1),
                    make_norm(norm, width),
                    nn.ReLU(),
                    nn.AvgPool2d(2) if pool else nn.Identity(),
                )
            )
            in_ch, size = width, (size // 2 if pool else size)
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(width * size * size, num_classes)

    def _trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        stages = []
        for block in self.blocks:
            x = block(x)
            stages.append(x)
        return stages, x.flatten(1)
