"""K copies of one architecture as one model: grouped convolutions, per-copy normalisation, batched heads.

stack_models([m_1, ..., m_K]) builds a model whose every tensor is the K copies' tensors concatenated
along dim 0 (copy k owns the k-th chunk), so copy k's parameters, buffers, gradients and optimiser
state are `.chunk(K)[k]` of the stacked ones, and its input and output are:

    input   [B, K*C, H, W]   copy k reads channels k*C .. (k+1)*C - 1   (the inputs concatenated on dim 1)
    output  [B, K, classes]  copy k's logits at [:, k]

The layers: Conv2d(C_in, C_out, groups=g) -> Conv2d(K*C_in, K*C_out, groups=K*g) (group k only sees
copy k's channels); BatchNorm2d(C) -> BatchNorm2d(K*C) and GroupNorm(G, C) -> GroupNorm(K*G, K*C)
(their statistics are per channel or per group, so per copy); the classifier `fc` -> StackedLinear
(a batched matrix product). Parameter-free layers (ReLU, pooling, Identity) act per channel and are
kept. The models' own forward code runs unchanged, which is exact wherever it only mixes channels
through those layers: true of every registry model (ConvNet with each norm, ResNet-AP, ResNet-18/50),
and tested per architecture against the copies run alone. A model with any other parametrised layer
raises NotStackable; its students then train one copy at a time.

One copy (K = 1) is the model itself, with its logits viewed as [B, 1, classes]: the exact
numerics of training it alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ddist.models.base import FeatureModel

# layers without parameters whose forward acts on each channel alone
_CHANNELWISE = (nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten)


class NotStackable(ValueError):
    """A model holds a layer stack_models cannot stack exactly."""


class StackedLinear(nn.Module):
    """K linear heads: input [B, K*D] (copy k's features in the k-th block), output [B, K, out]."""

    def __init__(self, heads: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.copies, self.in_features, self.out_features = len(heads), heads[0].in_features, heads[0].out_features
        self.weight = nn.Parameter(torch.cat([h.weight.detach() for h in heads]))  # [K*out, D]
        self.bias = nn.Parameter(torch.cat([h.bias.detach() for h in heads])) if heads[0].bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, d, o = self.copies, self.in_features, self.out_features
        x = x.reshape(x.shape[0], k, d).transpose(0, 1)  # [K, B, D]
        w = self.weight.view(k, o, d).transpose(1, 2)  # [K, D, out]
        y = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias.view(k, 1, o), x, w)
        return y.transpose(0, 1)  # [B, K, out]


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One model computing all of `models` (same architecture, any weights) at once; see the module
    docstring. Its state_dict has the plain models' names, each tensor the copies' concatenated."""
    if len(models) == 1:
        return _Stack(models[0], 1)
    if not all(isinstance(m, FeatureModel) for m in models):
        raise NotStackable("only FeatureModels (a trunk and an `fc` head) stack")
    stacked = copy.deepcopy(models[0])
    names = [n for n, _ in models[0].named_modules()]
    for name in names:
        layers = [m.get_submodule(name) for m in models]
        replacement = _stacked_layer(name, layers)
        if replacement is not None:
            _set_submodule(stacked, name, replacement)
    return _Stack(stacked, len(models))


class _Stack(nn.Module):
    """The stacked model; forward returns [B, K, classes]. One copy is the plain model itself, its
    logits viewed as [B, 1, classes]: the exact numerics of training it alone. Its state_dict has the
    plain model's names, so a copy's checkpoint is a student's."""

    def __init__(self, model: nn.Module, copies: int) -> None:
        super().__init__()
        self.model, self.copies = model, copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.unsqueeze(1) if self.copies == 1 else out

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state, strict=strict, assign=assign)


def _stacked_layer(name: str, layers: list[nn.Module]) -> nn.Module | None:
    """The stacked replacement of one layer of every copy (None: keep it, a container or channel-wise)."""
    first, k = layers[0], len(layers)
    if isinstance(first, nn.Conv2d):
        conv = nn.Conv2d(
            k * first.in_channels,
            k * first.out_channels,
            first.kernel_size,  # type: ignore[arg-type]
            stride=first.stride,  # type: ignore[arg-type]
            padding=first.padding,  # type: ignore[arg-type]
            dilation=first.dilation,  # type: ignore[arg-type]
            groups=k * first.groups,
            bias=first.bias is not None,
            padding_mode=first.padding_mode,
        )
        return _filled(conv, layers)
    if isinstance(first, nn.BatchNorm2d):
        norm = nn.BatchNorm2d(
            k * first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats
        )
        return _filled(norm, layers)
    if isinstance(first, nn.GroupNorm):
        return _filled(nn.GroupNorm(k * first.num_groups, k * first.num_channels, first.eps, first.affine), layers)
    if isinstance(first, nn.Linear) and name == "fc":
        return StackedLinear(layers)  # type: ignore[arg-type]
    if isinstance(first, _CHANNELWISE) or not any(True for _ in first.parameters(recurse=False)):
        if isinstance(first, nn.Linear):  # a Linear not at the head mixes the copies' features
            raise NotStackable(f"layer {name!r} ({type(first).__name__}) is not the classifier head")
        if list(first.buffers(recurse=False)) and not isinstance(first, _CHANNELWISE):
            raise NotStackable(f"layer {name!r} ({type(first).__name__}) holds buffers stack_models does not know")
        return None
    raise NotStackable(f"layer {name!r} ({type(first).__name__}) is not a layer stack_models knows")


def _filled(layer: nn.Module, copies: list[nn.Module]) -> nn.Module:
    """`layer` with each tensor the copies' tensors concatenated (a counter: the first copy's)."""
    states = [c.state_dict() for c in copies]
    state = {}
    for key, value in states[0].items():
        parts = [st[key] for st in states]
        state[key] = parts[0].clone() if value.dim() == 0 else torch.cat(parts)
    like = next(v for v in states[0].values() if v.is_floating_point())
    layer.to(device=like.device, dtype=like.dtype)  # floating tensors take the copies' dtype; counters stay
    layer.load_state_dict(state)
    return layer


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def copy_state(state: dict[str, torch.Tensor], k: int, copies: int) -> dict[str, torch.Tensor]:
    """Copy k's state dict from a stacked one (a 0-dim counter is every copy's)."""
    return {n: (v.clone() if v.dim() == 0 else v.chunk(copies)[k].clone()) for n, v in state.items()}


def load_copy_state(stacked: nn.Module, k: int, copies: int, state: dict[str, torch.Tensor]) -> None:
    """Write copy k's state dict into its chunk of the stacked model's tensors."""
    own = stacked.state_dict(keep_vars=True)
    missing = sorted(set(own) ^ set(state))
    if missing:
        raise KeyError(f"copy state does not match the stacked model: {missing[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            target = own[name]
            if target.dim() == 0:
                target.copy_(value)
            else:
                target.chunk(copies)[k].copy_(value)
