"""Seeded class-balanced subsets of a real split (the random-real baseline, real initialisation,
analyse's real reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from ddist.data.loaders import class_indices
from ddist.errors import ConfigError
from ddist.runtime.artifacts import save_distilled

# Offsets the real subsample's random stream from `seed` (see real_subsample).
SUBSAMPLE_SEED_OFFSET = 1_000_003


def pick_random_real(ds, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """Indices of `ipc` random train images per class, class by class (label order)."""
    pools = [class_indices(ds, c) for c in range(num_classes)]
    check_classes_hold(ipc, [len(p) for p in pools])
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([pool[torch.randperm(len(pool), generator=generator)[:ipc]] for pool in pools])


def check_classes_hold(ipc: int, counts: list[int]) -> None:
    """Every class has at least `ipc` training images; the message names the smallest class."""
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise ConfigError(
            f"class(es) {empty} have no training images: check that dataset.root holds images "
            "for every class in dataset.classes (e.g. train/<class>/ is not empty)."
        )
    smallest = min(range(len(counts)), key=counts.__getitem__)
    if counts[smallest] < ipc:
        short = [c for c, n in enumerate(counts) if n < ipc]
        raise ConfigError(
            f"ipc={ipc} but the smallest class ({smallest}) has only {counts[smallest]} training "
            f"images ({len(short)} class(es) have fewer than {ipc}). Set ipc <= {counts[smallest]}."
        )


def save_random_real(path: Path, train, spec, ipc: int, seed: int) -> Path:
    """The random-real set (IPC seeded images per class) written as a DistilledSet at `path`:
    the random pipeline's output and the analyse stage's same-IPC baseline."""
    idx = pick_random_real(train, spec.num_classes, ipc, seed)
    images = torch.stack([train[int(i)][0] for i in idx])
    meta = {"dataset": spec.name, "method": "random", "ipc": ipc, "seed": seed, "config": {"indices": idx.tolist()}}
    return save_distilled(path, images, train.targets[idx], spec, meta)


def real_subsample(train, num_classes: int, per_class: int, seed: int) -> list[torch.Tensor]:
    """Up to `per_class` random train indices of each class (all of a smaller class), seeded.

    The stream is offset from `seed` so the reference is an independent draw, not the very
    images the random pipeline (seeded by `seed` alone) picked as its DistilledSet.
    """
    generator = torch.Generator().manual_seed(SUBSAMPLE_SEED_OFFSET + seed)
    picked = []
    for c in range(num_classes):
        pool = class_indices(train, c)
        picked.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
    return picked


def same_ipc_rows(class_sizes: list[int], ipc: int) -> torch.Tensor:
    """Rows of the class-by-class subsample holding the first `ipc` images of each class."""
    rows, start = [], 0
    for size in class_sizes:
        rows.append(torch.arange(start, start + min(size, ipc)))
        start += size
    return torch.cat(rows)
