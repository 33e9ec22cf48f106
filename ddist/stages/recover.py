"""Recover: optimise synthetic pixels against the frozen teacher (SRe2L, DEDA, ...).

The loop is written once; `recover.objective` names the method (ddist/methods/), whose builder
makes the loss (ddist/objectives) from what it declares it needs:
- sre2l: CE + BatchNorm statistic matching (Yin et al., NeurIPS 2023)
- deda:  CE + per-class Gaussian alignment of pooled teacher features + covariance
         regulariser (Li et al., ICCV 2025); needs the real class statistics, computed
         once per teacher from the real train split and cached.

Recipe: classes x IPC images start from N(0, 1) noise in normalised space (or from random
real train images, `recover.init=real`), are split into batches (`recover.batch`) and each
batch (or stack of `batch.parallel_groups` batches) is optimised against the teacher
(ddist/training/recover.py: the batch layout, the objective builders and the loop; the real
class statistics: ddist/training/class_stats.py). The last iterate is saved as a DistilledSet.

Resume, reuse, shards (ddist/runtime/workdir.py): each group draws its starting noise and its
augmentations from its own generator, seeded from (seed, group), and is written to the
work directory <cache_dir>/recover/<hash of dataset, teacher, recover settings, ipc, seed>
as soon as it is done. A rerun of the same command skips the finished groups; a finished
set is reused; `shard.index` / `shard.count` split the groups among jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from omegaconf import OmegaConf

from ddist.config.schema import Config
from ddist.data import load_split
from ddist.data.subsets import pick_random_real
from ddist.errors import ConfigError
from ddist.logging import info, progress
from ddist.methods import recover_method
from ddist.runtime.artifacts import to_plain
from ddist.runtime.context import RunContext
from ddist.runtime.stages import Stage
from ddist.runtime.workdir import WorkDir, make_set
from ddist.training.loop import seed_everything
from ddist.training.recover import (
    Group,
    PixelSpace,
    batch_groups,
    group_generator,
    initial_images,
    objective_inputs,
    optimise_groups,
    pixel_bounds,
    stacks,
)
from ddist.training.teacher import load_teacher, teacher_identity

STAGE = Stage(name="recover", needs=frozenset({"teacher"}), makes=frozenset({"distilled"}), shared=True)


def recover_key(cfg: Config) -> dict:
    """Exactly what determines the recovered set: the data, the teacher, the recover settings, ipc and seed
    (every field of each: batch.parallel_groups too, since stacked groups differ from sequential ones by
    float rounding)."""
    return {
        "dataset": to_plain(cfg.dataset),
        "teacher": teacher_identity(cfg),
        "recover": to_plain(cfg.recover),
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
    }


def real_init(cfg: Config, spec):
    """rows -> the random real train images that start those rows of the class-major set."""
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    picked = pick_random_real(train, spec.num_classes, cfg.ipc, cfg.seed)
    return lambda rows: torch.stack([train[int(i)][0] for i in picked[rows]])


def run(cfg: Config, ctx: RunContext) -> RunContext:
    spec, rcfg = ctx.spec, cfg.recover
    seed_everything(cfg.seed)
    labels = torch.arange(spec.num_classes).repeat_interleave(cfg.ipc)
    groups = batch_groups(spec.num_classes, cfg.ipc, rcfg.batch.mode, rcfg.batch.size)
    ctx.method = recover_method(rcfg.objective).name  # results.json's too
    meta = {
        "dataset": spec.name,
        "method": ctx.method,
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "config": {"recover": to_plain(rcfg), "teacher": to_plain(cfg.teacher)},
    }
    plan = {"labels": labels.tolist(), "dataset": to_plain(cfg.dataset), "meta": meta}
    work = WorkDir(cfg, "recover", recover_key(cfg), "groups", len(groups), plan)
    return make_set(cfg, ctx, work, lambda todo: recover_groups(cfg, ctx, work, groups, labels, todo))


def recover_groups(
    cfg: Config, ctx: RunContext, work: WorkDir, groups: list[torch.Tensor], labels: torch.Tensor, todo: list[int]
) -> None:
    """Optimise the groups `todo`, saving each to the work directory as soon as it is done."""
    spec, device, logger, rcfg = ctx.spec, ctx.device, ctx.logger, cfg.recover
    method = recover_method(rcfg.objective)
    objective = method.build(rcfg, **objective_inputs(method.needs, cfg, ctx, load_teacher(cfg, ctx)))
    real = real_init(cfg, spec) if rcfg.init == "real" else None
    augment = OmegaConf.to_container(cfg.dataset.augment.recover, resolve=True, enum_to_str=True)
    space = PixelSpace(cast(dict, augment), spec.resolution, pixel_bounds(spec, device))
    bar = progress(desc=f"recover ({rcfg.objective})", total=len(todo) * rcfg.iterations)

    def on_step(it: int, loss: torch.Tensor, parts: dict, lr: float, groups: int = 1) -> None:
        bar.update(groups)
        if it % rcfg.log_every == 0 or it == rcfg.iterations - 1:
            logger.log(
                {"recover/loss": loss.item(), "recover/lr": lr, **{f"recover/{k}": v.item() for k, v in parts.items()}}
            )
            bar.set_postfix(loss=f"{loss.item():.4f}")

    def start(g: int) -> Group:
        """Group g's starting pixels, labels and generator (drawn from first, as each group alone)."""
        idx = groups[g]
        generator = group_generator(int(cfg.seed), g)
        x0 = initial_images(spec, len(idx), generator) if real is None else real(idx)
        return Group(x0.to(device), labels[idx].to(device), generator)

    def done(g: int, images: torch.Tensor) -> None:
        work.save(g, images.cpu(), groups[g])
        info(f"recover batch {g + 1}/{len(groups)} done ({len(groups[g])} images, {rcfg.iterations} iterations)")

    try:
        for stack in stacks(todo, [len(idx) for idx in groups], rcfg.batch.parallel_groups):
            if len(stack) > 1 and not method.stacks:
                raise ConfigError(
                    f"recover.batch.parallel_groups={rcfg.batch.parallel_groups} needs a recover.objective whose "
                    f"batches stack (not {method.name}); set recover.batch.parallel_groups=1."
                )
            images = optimise_groups(objective, [start(g) for g in stack], rcfg, space, on_step)
            for g, images_g in zip(stack, images, strict=True):
                done(g, images_g)
    finally:
        objective.close()
        bar.close()
