"""One registry from a model config (a name, or a mapping with `name` and keyword args) to a model.

Evaluate's students are named by the presets in conf/model (`student_config`), the same
files `model@teacher.model` selects, so "convnet6" means conf/model/convnet6.yaml wherever
it appears.
"""

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddist import CONF_DIR
from ddist.errors import ConfigError
from ddist.models.base import FeatureModel
from ddist.models.convnet import ConvNet
from ddist.models.resnet import build_resnet
from ddist.models.resnet_ap import ResNetAP10, min_resolution


def _convnet(num_classes: int, channels: int, resolution: int, depth: int, width: int, norm: str) -> ConvNet:
    if depth < 1 or width < 1:
        raise ConfigError(f"model.depth={depth} and model.width={width} must both be >= 1; fix them.")
    return ConvNet(num_classes, channels, resolution, depth=depth, width=width, norm=norm)


def _resnet_ap10(num_classes: int, channels: int, resolution: int, stem: str, norm: str) -> ResNetAP10:
    """stem auto -> "imagenet" from 128px up (ImageNet subsets at 128-224px), else "cifar"."""
    if stem == "auto":
        stem = "imagenet" if resolution >= 128 else "cifar"
    if resolution < min_resolution(stem):
        raise ConfigError(
            f"resnet_ap10 with model.stem={stem} needs images of at least "
            f"{min_resolution(stem)}px, got {resolution}px; set model.stem=cifar or use a "
            f"larger dataset.resolution."
        )
    return ResNetAP10(num_classes, channels, stem=stem, norm=norm)


_BUILDERS: dict[str, Callable[..., FeatureModel]] = {
    "convnet": _convnet,
    # one builder for torchvision's ResNets, the architecture bound by name (its signature keeps the options)
    "resnet18": functools.partial(build_resnet, "resnet18"),
    "resnet50": functools.partial(build_resnet, "resnet50"),
    "resnet_ap10": _resnet_ap10,
}
MODEL_NAMES = tuple(sorted(_BUILDERS))
PRESET_DIR = CONF_DIR / "model"


@functools.cache
def _preset(name: str) -> dict[str, Any]:
    """The fields of conf/model/<name>.yaml, the one place a model's defaults live ({} without such a file)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        return {}
    fields = cast("dict[str, Any]", OmegaConf.to_container(OmegaConf.load(path)))
    return {k: v for k, v in fields.items() if k not in ("defaults", "name")}


def _as_dict(model_cfg) -> dict:
    """A plain dict {name: ..., **kwargs} from a str name, a dict or a DictConfig."""
    if isinstance(model_cfg, str):
        return {"name": model_cfg}
    if isinstance(model_cfg, DictConfig):
        return cast("dict[str, Any]", OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True))
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    raise ConfigError(
        f"model config must be a model name or a mapping with a `name` key, got {model_cfg!r}; "
        f"set model to one of {list(MODEL_NAMES)}."
    )


def build_model(model_cfg, num_classes: int, channels: int, resolution: int) -> FeatureModel:
    """Build a freshly initialised model (or a torchvision-pretrained one) from its config.

    model_cfg: "convnet" or {name: convnet, depth: 3, width: 128, norm: batch}; the keys
    besides `name` are the builder's keyword arguments, and those it leaves out come from the preset
    of the same name (conf/model/<name>.yaml: the builders and the models have no defaults of their own).
    num_classes, channels and resolution come from the dataset spec.
    """
    kwargs = _as_dict(model_cfg)
    name = kwargs.pop("name", None)
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model name {name!r}; set model.name to one of {list(MODEL_NAMES)}.")
    kwargs = {**_preset(name), **kwargs}
    builder = _BUILDERS[name]
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "channels", "resolution")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model {name!r} does not take option(s) {unknown}; remove them from the model "
            f"config (valid options: {allowed})."
        )
    return builder(num_classes, channels, resolution, **kwargs)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def student_config(entry) -> tuple[str, dict]:
    """An `evaluate.students` entry -> (its name, the model config for build_model).

    An entry is a preset name of conf/model ("convnet6") or a mapping {name: <preset>, ...}
    whose other keys override the preset's fields ({name: convnet, width: 16}). The result is
    checked against the preset's schema (ddist/config/schema.py), as composing the preset would.
    """
    fields = _as_dict(entry)
    name = fields.pop("name", None)
    presets = preset_names()
    if name not in presets:
        raise ConfigError(
            f"evaluate.students names {name!r}, which is not a model preset; use the name of a "
            f"file in {PRESET_DIR}: {', '.join(presets)} (or {{name: <preset>, <field>: <value>}})."
        )
    preset = cast(DictConfig, OmegaConf.load(PRESET_DIR / f"{name}.yaml"))
    schemas = [ConfigStore.instance().load(f"model/{s}.yaml").node for s in preset.pop("defaults") if s != "_self_"]
    try:
        model_cfg = OmegaConf.merge(*schemas, preset, fields)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"evaluate.students entry {entry!r}: {str(err).splitlines()[0]} (preset conf/model/{name}.yaml)."
        ) from None
    return name, cast("dict[str, Any]", OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True))
