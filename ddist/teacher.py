"""The frozen teacher: what identifies it (its cache key), how it is built and loaded.

The squeeze stage trains or loads it; recover, relabel, evaluate, analyse and the CGS
teacher kernel read it through `load_teacher`.
"""

from __future__ import annotations

from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from ddist.artifacts import load_checkpoint, load_model_state
from ddist.data.augment import augment_key
from ddist.errors import ConfigError
from ddist.models import FeatureModel, build_model

# dataset keys that do not change the teacher (they steer other stages)
_NOT_TEACHER_KEYS = ("protocol", "download")
# teacher keys that do not change its weights
_NOT_WEIGHT_KEYS = ("checkpoint", "num_workers", "log_every")


def teacher_key(cfg: DictConfig) -> dict:
    """Exactly the config that determines the teacher's weights."""
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    for name in _NOT_TEACHER_KEYS:
        dataset.pop(name, None)
    if dataset.get("subset") is None:  # keeps the keys of teachers cached before the option valid
        dataset.pop("subset", None)
    dataset["augment"] = augment_key(dataset["augment"]["student"])
    teacher = cast("dict[str, Any]", OmegaConf.to_container(cfg.teacher, resolve=True, enum_to_str=True))
    for name in _NOT_WEIGHT_KEYS:
        teacher.pop(name, None)
    if teacher.get("clip_grad_norm") is None:  # keeps the keys of teachers cached before the option valid
        teacher.pop("clip_grad_norm", None)
    key: dict[str, Any] = {"dataset": dataset, "teacher": teacher}
    if cfg.precision != "fp32":  # fp32 keys stay those of teachers cached before the option
        key["precision"] = cfg.precision
    return key


def build_teacher(cfg: DictConfig, spec) -> FeatureModel:
    return build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution)


def load_teacher(cfg: DictConfig, ctx: dict) -> FeatureModel:
    """The teacher made by the squeeze stage, in eval mode on ctx['device'], with gradients off for its weights."""
    model = build_teacher(cfg, ctx["spec"])
    path = ctx["teacher"]
    load_model_state(model, load_checkpoint(path, "teacher.checkpoint"), path, "teacher.checkpoint")
    model.requires_grad_(False)
    return model.to(ctx["device"]).eval()


def deda_layers(cfg: DictConfig, teacher) -> list[str]:
    """The feature stages DEDA aligns, in teacher order; default: every "stageK" (pooled maps)."""
    names = list(teacher.feature_names)
    wanted = cfg.recover.deda.layers
    if wanted is None:
        return [n for n in names if n.startswith("stage")]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise ConfigError(
            f"recover.deda.layers={list(wanted)} names no or unknown teacher features {unknown}; "
            f"set it to a non-empty subset of {names} (or null for every stage)."
        )
    return [n for n in names if n in wanted]
