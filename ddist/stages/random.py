"""Random real images: IPC images per class drawn (seeded) from the real train split.

The baseline every distillation method is compared with under the same protocol.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ddist.artifacts import save_distilled
from ddist.data import class_indices, load_split
from ddist.errors import ConfigError


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
        raise ConfigError(f"class(es) {empty} have no training images: check that dataset.root holds images "
                          "for every class in dataset.classes (e.g. train/<class>/ is not empty).")
    smallest = min(range(len(counts)), key=counts.__getitem__)
    if counts[smallest] < ipc:
        short = [c for c, n in enumerate(counts) if n < ipc]
        raise ConfigError(f"ipc={ipc} but the smallest class ({smallest}) has only {counts[smallest]} training "
                          f"images ({len(short)} class(es) have fewer than {ipc}). Set ipc <= {counts[smallest]}.")


def run(cfg: DictConfig, ctx: dict) -> dict:
    spec = ctx["spec"]
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    idx = pick_random_real(train, spec.num_classes, cfg.ipc, cfg.seed)
    images = torch.stack([train[int(i)][0] for i in idx])
    path = save_distilled(Path(ctx["run_dir"]) / "distilled", images, train.targets[idx], spec,
                          {"dataset": spec.name, "method": "random", "ipc": cfg.ipc, "seed": cfg.seed,
                           "config": {"indices": idx.tolist()}})
    ctx["distilled"] = path
    return ctx
