"""torchvision ResNet-18/50 with a choice of stem, and optional torchvision ImageNet weights."""

import os
import pickle
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from ddist.errors import ConfigError
from ddist.models.base import FeatureModel, spatial_mean


class TorchvisionResNet(FeatureModel):
    """A torchvision ResNet whose four layers are the feature stages.

    Submodules keep torchvision's names (conv1, bn1, ..., layer4, fc) so torchvision
    state dicts load unchanged. stem="cifar" replaces the 7x7 stride-2 conv and the
    max-pool with one 3x3 stride-1 conv, the usual choice for 32-64px images, where the
    ImageNet stem would shrink a 32px image to 8px before the first residual block.
    """

    num_stages = 4
    # torchvision's submodules, adopted in __init__ by setattr
    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(self, arch: str, num_classes: int, channels: int, stem: str):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if stem == "cifar":
            net.conv1 = _kaiming(nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False))
            net.maxpool = nn.Identity()
        elif channels != 3:
            net.conv1 = _kaiming(nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False))
        for name in (
            "conv1",
            "bn1",
            "relu",
            "maxpool",
            "layer1",
            "layer2",
            "layer3",
            "layer4",
            "fc",
        ):
            setattr(self, name, getattr(net, name))

    def _trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return stages, spatial_mean(x)


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    """Initialise a replacement conv the way torchvision initialises the convs it builds."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def resolve_stem(stem: str, resolution: int, pretrained: bool) -> str:
    """auto -> the ImageNet stem when pretrained weights are loaded (they were trained with
    it) or the images are larger than 64px, else the CIFAR stem."""
    if stem == "auto":
        return "imagenet" if pretrained or resolution > 64 else "cifar"
    if stem == "cifar" and pretrained:
        raise ConfigError(
            "model.pretrained needs model.stem=imagenet (the torchvision weights were trained "
            "with the ImageNet stem); set model.stem=imagenet or auto, or model.pretrained=false."
        )
    return stem


def build_resnet(
    arch: str,
    num_classes: int,
    channels: int,
    resolution: int,
    stem: str,
    pretrained: bool | str,
) -> TorchvisionResNet:
    """torchvision `arch` ("resnet18" | "resnet50"), optionally with torchvision weights.

    pretrained: false, true (torchvision's DEFAULT weights) or a weights name of the
    model's enum, e.g. "IMAGENET1K_V1" or "ResNet50_Weights.IMAGENET1K_V2".
    """
    weights = _weights(arch, pretrained)
    stem = resolve_stem(stem, resolution, weights is not None)
    model = TorchvisionResNet(arch, num_classes, channels, stem)
    if weights is not None:
        if channels != 3 or num_classes != 1000:
            raise ConfigError(
                f"model.pretrained={pretrained!r} loads ImageNet-1k weights, which need 3 input "
                f"channels and 1000 classes, but the dataset has {channels} channels and "
                f"{num_classes} classes; set model.pretrained=false."
            )
        model.load_state_dict(_load_weights(weights))
    return model


def _weights(arch: str, pretrained: bool | str):
    """The torchvision weights enum member `pretrained` names, or None for no weights."""
    if pretrained is False or pretrained is None:
        return None
    enum = torchvision.models.get_model_weights(arch)
    if pretrained is True:
        return enum.DEFAULT
    name = str(pretrained).split(".")[-1]
    if name not in enum.__members__:
        raise ConfigError(
            f"model.pretrained={pretrained!r} is not a torchvision weights name for {arch}; "
            f"set it to true, false or one of {list(enum.__members__)}."
        )
    return enum[name]


def _load_weights(weights) -> dict:
    """The weights' state dict from the torch hub cache, downloading it there if missing.

    Any failure (no network, a corrupt file) becomes a ConfigError naming the file to place
    and the directory to place it in, since this machine may never reach the internet.
    """
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(cache_dir, os.path.basename(urlparse(weights.url).path))
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    # OSError covers URLError/HTTPError/timeouts; RuntimeError a hash mismatch or a bad zip;
    # EOFError/UnpicklingError a truncated or non-checkpoint file.
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"model.pretrained: could not load torchvision weights {weights} ({type(err).__name__}: {err}). "
            f"Download {weights.url} on a machine with internet and place it at {path} "
            f"(the torch hub checkpoints dir; set TORCH_HOME to move it), or set model.pretrained=false."
        ) from None
