"""Real class statistics: the teacher's per-class feature mean and covariance over the real train
split (all of it, or a seeded subset per class), which DEDA aligns to; computed once per teacher
and cached under <cache_dir>/class_stats/<hash of class_stats_key>.

A shared service: any recover method that declares the need `class_stats` (ddist/methods/) gets
them, at the layers, batch size and subset of `recover.class_stats`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ddist.config.schema import AnyConfig
from ddist.data import ImageDataset, load_split, torch_dataset
from ddist.errors import ConfigError
from ddist.logging import info, progress
from ddist.objectives import ClassMomentSums
from ddist.runtime import store
from ddist.runtime.artifacts import atomic_save_tensors, load_tensors
from ddist.runtime.context import RunContext
from ddist.training.teacher import frozen_teacher, teacher_identity
from ddist.utils import ceil_div


def class_stats_layers(cfg: AnyConfig, feature_names: list[str]) -> list[str]:
    """The teacher features the statistics cover (recover.class_stats.layers), in teacher order; default:
    every "stageK" (pooled maps). `feature_names`: the teacher's (FeatureModel.feature_names)."""
    names = list(feature_names)
    wanted = cfg.recover.class_stats.layers
    if wanted is None:
        return [n for n in names if n.startswith("stage")]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise ConfigError(
            f"recover.class_stats.layers={list(wanted)} names no or unknown teacher features {unknown}; "
            f"set it to a non-empty subset of {names} (or null for every stage)."
        )
    return [n for n in names if n in wanted]


def class_stats_key(cfg: AnyConfig, layers: list[str]) -> dict:
    """What determines the real class statistics: the teacher, the real data it saw (all of it, or a
    seeded subset per class), and the layers."""
    return {**teacher_identity(cfg), "layers": layers, "images_per_class": cfg.recover.class_stats.images_per_class}


# The subset of real images per class is drawn with this seed, not the run's, so every seed of a
# sweep shares one cached set of statistics per teacher.
STATS_SUBSET_SEED = 0


def stats_indices(targets: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Indices of the real images the class statistics read, in label order: all of them, or
    `per_class` drawn at random (seeded) from each class (all of a class that has fewer)."""
    order = torch.sort(targets, stable=True).indices
    if per_class is None:
        return order
    generator = torch.Generator().manual_seed(STATS_SUBSET_SEED)
    counts = torch.bincount(targets).tolist()
    return torch.cat(
        [
            members[torch.randperm(len(members), generator=generator)[:per_class]].sort().values
            for members in order.split(counts)
        ]
    )


def class_sorted_batches(
    ds: ImageDataset, spec, batch_size: int, num_workers: int = 0, order: torch.Tensor | None = None
):
    """Normalised real batches in label order (`order`, default all images), so each batch
    holds few classes (cheap reductions)."""
    if order is None:
        order = torch.sort(ds.targets, stable=True).indices
    images = ds.images
    if images is None:  # decoded from files: let loader workers do it
        yield from DataLoader(Subset(torch_dataset(ds), order.tolist()), batch_size=batch_size, num_workers=num_workers)
        return
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield spec.normalize(images[idx].float() / 255), ds.targets[idx]


@torch.inference_mode()
def real_class_stats(
    teacher, batches, num_classes: int, layers: list[str], device: torch.device, total: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (mean [C, d], cov [C, d, d])} of the teacher's features over real batches:
    one forward per batch (features only, no classifier head), per-class sums accumulated by
    index_add (ClassMomentSums)."""
    sums = None
    for x, y in progress(batches, desc="recover: real class statistics", total=total):
        feats = teacher.features(x.to(device))
        if sums is None:
            sums = ClassMomentSums(num_classes, {k: feats[k].shape[1] for k in layers}, device)
        sums.update(feats, y.to(device))
    assert sums is not None, "no real batches"
    return sums.moments()


def load_class_stats(cfg: AnyConfig, ctx: RunContext, teacher, layers: list[str]) -> dict:
    """The cached real class statistics for this teacher and these layers (computed on a miss; a
    store entry, ddist/runtime/store.py: one process computes them, the others wait and read)."""

    def build(e: store.Entry) -> None:
        path = e / "class_stats.safetensors"
        train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
        order = stats_indices(train.targets, cfg.recover.class_stats.images_per_class)
        batch_size = cfg.recover.class_stats.batch_size
        batches = class_sorted_batches(train, ctx.spec, batch_size, cfg.teacher.num_workers, order)
        stats = real_class_stats(
            frozen_teacher(cfg, teacher),
            batches,
            ctx.spec.num_classes,
            layers,
            ctx.device,
            total=ceil_div(len(order), batch_size),
        )
        atomic_save_tensors(
            path, {f"{k}.{part}": t for k, pair in stats.items() for part, t in zip(("mean", "cov"), pair, strict=True)}
        )
        info(f"real class statistics for {layers} cached at {path}")

    def read(e: store.Entry) -> dict:
        tensors = load_tensors(e / "class_stats.safetensors", what="real class statistics")
        stats = {}
        for k in layers:
            mean, cov = tensors.get(f"{k}.mean"), tensors.get(f"{k}.cov")
            if mean is None or cov is None or mean.ndim != 2 or cov.shape != (*mean.shape, mean.shape[1]):
                raise e.damaged(f"has no [classes, d] mean and [classes, d, d] covariance of layer {k}")
            stats[k] = (mean.to(ctx.device), cov.to(ctx.device))
        return stats

    return store.cached(store.entry(cfg, "class_stats", class_stats_key(cfg, layers)), build, read)
