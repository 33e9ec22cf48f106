"""The frozen teacher: what identifies it (its cache key), how it is built and loaded.

The squeeze stage trains or loads it; recover, relabel, evaluate, analyse and the CGS
teacher kernel read it through `load_teacher`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from ddist.config.schema import AnyConfig
from ddist.models import FeatureModel, build_model
from ddist.models.fold import fold_batchnorm
from ddist.runtime.artifacts import load_checkpoint, load_model_state
from ddist.runtime.context import RunContext
from ddist.runtime.ranks import launched_world

# dataset keys that do not change the teacher (they steer other stages)
_NOT_TEACHER_KEYS = ("protocol", "download")
# teacher keys that do not change its weights
_NOT_WEIGHT_KEYS = ("checkpoint", "num_workers", "log_every", "eval_every", "fold_bn", "channels_last")


def teacher_key(cfg: AnyConfig) -> dict:
    """Exactly the config that determines the teacher's weights: every field of dataset (but
    _NOT_TEACHER_KEYS, and of its augmentation the student's, which the teacher trains with), of
    teacher (but _NOT_WEIGHT_KEYS), precision (the store's rule: ddist/runtime/store.py), and the rank
    count that trains it (DDP averages per-rank gradient means and BatchNorm keeps per-rank statistics,
    so 2 gloo ranks give other weights than one process). The squeeze stage, which every launched rank
    runs, trains it: the key reads torchrun's launch (launched_world), not world(), which is 1 in the
    stages rank 0 runs alone and which also key on the teacher (teacher_identity)."""
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    for name in _NOT_TEACHER_KEYS:
        dataset.pop(name, None)
    dataset["augment"] = dataset["augment"]["student"]
    teacher = cast("dict[str, Any]", OmegaConf.to_container(cfg.teacher, resolve=True, enum_to_str=True))
    for name in _NOT_WEIGHT_KEYS:
        teacher.pop(name, None)
    return {"dataset": dataset, "teacher": teacher, "precision": cfg.precision, "world_size": launched_world()}


def build_teacher(cfg: AnyConfig, spec) -> FeatureModel:
    return build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution)


def teacher_identity(cfg: AnyConfig) -> dict:
    """The teacher in a cache key of what it made: its key (with the real data it saw), and the
    bytes of a given checkpoint (teacher.checkpoint)."""
    key: dict[str, Any] = {"teacher": teacher_key(cfg)}
    if cfg.teacher.checkpoint:
        key["checkpoint_sha256"] = hashlib.sha256(Path(cfg.teacher.checkpoint).read_bytes()).hexdigest()
    return key


def load_teacher(cfg: AnyConfig, ctx: RunContext) -> FeatureModel:
    """The teacher made by the squeeze stage, in eval mode on ctx.device, with gradients off for its weights,
    in channels_last layout with `teacher.channels_last`."""
    model = build_teacher(cfg, ctx.spec)
    path = ctx.require("teacher")
    load_model_state(model, load_checkpoint(path, "teacher.checkpoint"), path, "teacher.checkpoint")
    model.requires_grad_(False)
    layout = torch.channels_last if cfg.teacher.channels_last else torch.contiguous_format
    return model.to(ctx.device).to(memory_format=layout).eval()


def frozen_teacher(cfg: AnyConfig, teacher: FeatureModel) -> FeatureModel:
    """The teacher for passes that never read BatchNorm inputs (DEDA recover, its real class
    statistics, relabel, online soft labels, analysis): with `teacher.fold_bn` a copy with BatchNorm folded into
    the convs (in channels_last with `teacher.channels_last`); else `teacher`."""
    if not cfg.teacher.fold_bn:
        return teacher
    return fold_batchnorm(teacher, channels_last=cfg.teacher.channels_last)


def teacher_feature_names(cfg: AnyConfig, spec) -> list[str]:
    """The teacher's feature keys (FeatureModel.feature_names) from its architecture alone: built on the
    meta device without weights, so validation can check options that name them before any work."""
    model = cast("dict[str, Any]", OmegaConf.to_container(cfg.teacher.model, resolve=True, enum_to_str=True))
    if model.get("pretrained"):
        model["pretrained"] = False  # the architecture is the same; no download
    with torch.device("meta"):
        return list(build_model(model, spec.num_classes, spec.channels, spec.resolution).feature_names)
