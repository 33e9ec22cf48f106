"""Random real images: IPC images per class drawn (seeded) from the real train split.

The baseline every distillation method is compared with under the same protocol.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ddist.artifacts import save_distilled
from ddist.data import load_split
from ddist.data.subsets import pick_random_real


def run(cfg: DictConfig, ctx: dict) -> dict:
    spec = ctx["spec"]
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    idx = pick_random_real(train, spec.num_classes, cfg.ipc, cfg.seed)
    images = torch.stack([train[int(i)][0] for i in idx])
    path = save_distilled(
        Path(ctx["run_dir"]) / "distilled",
        images,
        train.targets[idx],
        spec,
        {
            "dataset": spec.name,
            "method": "random",
            "ipc": cfg.ipc,
            "seed": cfg.seed,
            "config": {"indices": idx.tolist()},
        },
    )
    ctx["distilled"] = path
    return ctx
