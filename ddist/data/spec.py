"""What a dataset is: classes, channels, resolution and normalisation.

`ddist.data.layouts.dataset_spec(cfg.dataset)` turns the `dataset` config group into a
`DatasetSpec`. Datasets whose classes are only known from disk (`folder`,
`imagenet1k`) list their class folders here, so the spec and the loaders agree
on one label order. `dataset.subset: {classes: K, per_class: N}` keeps the
first K labels (quick runs, `dry_run`); the loaders then keep the first N
images of each. Format `synthetic` stands in for absent data with random
images (dry runs only: nothing can be learned from it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from ddist.errors import ConfigError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset; labels index `classes` (and `wnids`)."""

    name: str
    classes: tuple[str, ...]
    wnids: tuple[str, ...] | None
    channels: int
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Shape [C,1,1] broadcasts over [..., C, H, W].
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Map images in [0,1] (shape [..., C, H, W]) to the normalised space models see."""
        mean, std = self._stats(x01)
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize` (no clamping, so it is exact)."""
        mean, std = self._stats(x)
        return x * std + mean


def as_dict(cfg_dataset: Mapping[str, Any] | DictConfig) -> dict:
    """A plain, resolved dict from a DictConfig node or a mapping."""
    if isinstance(cfg_dataset, DictConfig):
        return cast("dict[str, Any]", OmegaConf.to_container(cfg_dataset, resolve=True, enum_to_str=True))
    return dict(cfg_dataset)


def data_root(cfg: dict) -> Path:
    """`dataset.root` as an absolute path; a ConfigError when it is not set."""
    root = cfg.get("root")
    if not root:
        raise ConfigError(
            f"Dataset {cfg.get('name')!r} (format {cfg.get('format')!r}) needs its files: "
            "set dataset.root=/path/to/the/data."
        )
    return Path(root).expanduser().resolve()


def per_channel(cfg: dict, key: str, channels: int) -> tuple[float, ...]:
    values: Any = cfg.get(key)
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ConfigError(
            f"dataset.{key} has {len(values)} values but dataset.channels is {channels}; "
            f"give one value per channel (or a single value) in dataset.{key}."
        )
    return tuple(float(v) for v in values)


def subset_size(cfg: dict) -> tuple[int | None, int | None]:
    """(classes, per_class) of `dataset.subset`; None where the whole dataset is kept."""
    subset = cfg.get("subset") or {}
    if not isinstance(subset, Mapping) or set(subset) - {"classes", "per_class"}:
        raise ConfigError(
            f"dataset.subset={subset!r} is not a subset: give dataset.subset={{classes: K, per_class: N}} "
            "(either may be null), or dataset.subset=null for the whole dataset."
        )
    sizes = (subset.get("classes"), subset.get("per_class"))
    for key, v in zip(("classes", "per_class"), sizes, strict=True):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"dataset.subset.{key}={v!r} must be an integer >= 1, or null (no limit); fix it.")
    return sizes


def data_present(ds: DictConfig) -> bool:
    """The dataset's files are where the config says (or need none): else a dry run makes synthetic images."""
    if ds.format in ("digits", "synthetic"):  # shipped with scikit-learn / made up
        return True
    return bool(ds.root) and Path(ds.root).expanduser().is_dir()
