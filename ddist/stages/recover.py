"""Recover: optimise synthetic pixels against the frozen teacher (SRe2L, DEDA).

The loop is written once; `recover.objective` picks the loss (ddist/objectives):
- sre2l: CE + BatchNorm statistic matching (Yin et al., NeurIPS 2023)
- deda:  CE + per-class Gaussian alignment of pooled teacher features + covariance
         regulariser (Li et al., ICCV 2025); needs the real class statistics, computed
         once per teacher from the real train split and cached.

Recipe: classes x IPC images start from N(0, 1) noise in normalised space (or from random
real train images, `recover.init=real`) and are split into batches (`recover.batch`):
  - ipc_slice: each batch holds one image per class (per IPC index), as SRe2L's reference;
  - whole_class: each batch holds all IPC images of its classes, which DEDA's per-class
    statistics need.
`batch.size` caps the images per batch (null: all classes in one batch). Each batch is
optimised on its own for `iterations` steps: Adam (betas), cosine (or constant) lr, a
fresh random augmentation of the batch every step (`dataset.augment.recover`), the
teacher in eval mode, the objective, a step, then the pixels clipped to the valid range
of the normalised image. The last iterate is saved as a DistilledSet.

Resume, reuse, shards (ddist/workdir.py): each group draws its starting noise and its
augmentations from its own generator, seeded from (seed, group), and is written to the
work directory <cache_dir>/recover/<hash of dataset, teacher, recover settings, ipc, seed>
as soon as it is done. A rerun of the same command skips the finished groups; a finished
set is reused; `shard.index` / `shard.count` split the groups among jobs.

Stacked groups (`batch.parallel_groups` G > 1, SRe2L): up to G groups of one size run as one
problem, their pixels one leaf [G * B, C, H, W], one teacher forward, the BN statistics and
CE per group, the SUM of the groups' losses, one Adam. Adam, the clamp and the lr schedule
act elementwise and each group's pixels only reach its own loss, so every group gets the
steps it would get alone (up to float rounding); each keeps its own generator and is saved
on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from ddist.artifacts import atomic_save_tensors, cache_entry, load_tensors, to_plain
from ddist.context import RunContext
from ddist.data import ImageDataset, load_split, torch_dataset
from ddist.data.augment import apply, apply_groups, dataset_augment_key, sample_params
from ddist.data.subsets import pick_random_real
from ddist.errors import ConfigError
from ddist.logging import info, progress, warn
from ddist.models import FeatureModel
from ddist.objectives import ClassMomentSums, DEDAObjective, RecoverObjective, SRe2LObjective
from ddist.teacher import deda_layers, frozen_teacher, load_teacher, teacher_identity
from ddist.train import check_finite, make_schedule, seed_everything
from ddist.utils import ceil_div
from ddist.workdir import WorkDir, make_set

# ----------------------------------------------------------------------------- batches and pixels


def batch_groups(num_classes: int, ipc: int, mode: str, size: int | None) -> list[torch.Tensor]:
    """Indices (into the class-major image tensor, image (c, i) at c * ipc + i) of each batch.

    ipc_slice: for each IPC index i, chunks of `size` classes, one image each (SRe2L);
    whole_class: chunks of max(1, size // ipc) classes with all their images (DEDA).
    """
    if mode == "ipc_slice":
        per_batch = size or num_classes
        return [
            torch.arange(start, min(start + per_batch, num_classes)) * ipc + i
            for i in range(ipc)
            for start in range(0, num_classes, per_batch)
        ]
    per_batch = max(1, size // ipc) if size else num_classes
    return [
        torch.arange(start * ipc, min(start + per_batch, num_classes) * ipc)
        for start in range(0, num_classes, per_batch)
    ]


def pixel_bounds(spec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel [1, C, 1, 1] bounds of the normalised image: (0 - mean) / std .. (1 - mean) / std."""
    low = spec.normalize(torch.zeros(1, spec.channels, 1, 1))
    high = spec.normalize(torch.ones(1, spec.channels, 1, 1))
    return low.to(device), high.to(device)


def initial_images(spec, n: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) starting images [n, C, H, W] in normalised space."""
    return torch.randn((n, spec.channels, spec.resolution, spec.resolution), generator=generator)


def real_init(cfg: DictConfig, spec):
    """rows -> the random real train images that start those rows of the class-major set."""
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    picked = pick_random_real(train, spec.num_classes, cfg.ipc, cfg.seed)
    return lambda rows: torch.stack([train[int(i)][0] for i in picked[rows]])


# ----------------------------------------------------------------------------- real class statistics


def class_stats_key(cfg: DictConfig, layers: list[str]) -> dict:
    """What determines the real class statistics: the teacher, the real data it saw (all of it, or a
    seeded subset per class), and the layers."""
    key = {**teacher_identity(cfg), "layers": layers}
    if cfg.recover.deda.stats_images_per_class is not None:  # null keeps the keys of statistics cached before
        key["images_per_class"] = cfg.recover.deda.stats_images_per_class
    return key


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


def load_class_stats(cfg: DictConfig, ctx: RunContext, teacher, layers: list[str]) -> dict:
    """The cached real class statistics for this teacher and these layers (computed on a miss)."""
    entry = cache_entry(cfg, "class_stats", class_stats_key(cfg, layers))
    path = entry / "class_stats.safetensors"
    if not path.exists():
        train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
        order = stats_indices(train.targets, cfg.recover.deda.stats_images_per_class)
        batch_size = cfg.recover.deda.stats_batch_size
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
    tensors = load_tensors(path, what="real class statistics")
    return {k: (tensors[f"{k}.mean"].to(ctx.device), tensors[f"{k}.cov"].to(ctx.device)) for k in layers}


# ----------------------------------------------------------------------------- setup


def build_sre2l(cfg: DictConfig, ctx: RunContext, teacher: FeatureModel) -> RecoverObjective:
    rcfg = cfg.recover
    objective = SRe2LObjective(teacher, ce_weight=rcfg.ce_weight, **rcfg.bn_matching)
    if objective.num_bn_layers == 0:
        objective.close()
        raise ConfigError(
            "recover.objective=sre2l matches BatchNorm statistics, but the teacher has no "
            "BatchNorm2d layer; use a teacher with teacher.model.norm=batch (or recover=deda)."
        )
    return objective


def build_deda(cfg: DictConfig, ctx: RunContext, teacher: FeatureModel) -> RecoverObjective:
    rcfg, dcfg = cfg.recover, cfg.recover.deda
    layers = deda_layers(cfg, teacher)
    real = load_class_stats(cfg, ctx, teacher, layers)
    return DEDAObjective(
        frozen_teacher(cfg, teacher),  # DEDA reads no BatchNorm inputs: fold them away
        real,
        cfg.ipc,
        mean_weight=dcfg.mean_weight,
        gamma=dcfg.gamma,
        gamma_scope=dcfg.gamma_scope,
        lambda_diag=dcfg.lambda_diag,
        lambda_offdiag=dcfg.lambda_offdiag,
        reg_iterations=dcfg.reg_iterations,
        reg_normalisation=dcfg.reg_normalisation,
        class_reduction=dcfg.class_reduction,
        ce_weight=rcfg.ce_weight,
    )


# recover.objective -> the builder of its objective
OBJECTIVE_BUILDERS: dict[str, Callable[[DictConfig, RunContext, FeatureModel], RecoverObjective]] = {
    "sre2l": build_sre2l,
    "deda": build_deda,
}


def build_objective(cfg: DictConfig, ctx: RunContext, teacher: FeatureModel) -> RecoverObjective:
    return OBJECTIVE_BUILDERS[cfg.recover.objective](cfg, ctx, teacher)


# ----------------------------------------------------------------------------- the loop


def optimise_batch(
    objective: RecoverObjective,
    x0: torch.Tensor,
    labels: torch.Tensor,
    rcfg,
    augment,
    resolution: int,
    bounds: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    on_step,
) -> torch.Tensor:
    """Optimise one batch of pixels for `rcfg.iterations` steps; returns the last iterate."""
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=rcfg.lr, betas=tuple(rcfg.betas))
    iterations = rcfg.iterations
    schedule = make_schedule(optimizer, rcfg, iterations)
    losses = []
    for it in range(iterations):
        x_aug = apply(x, sample_params(len(labels), augment, resolution, generator))
        loss, parts = objective(x_aug, labels, it, iterations)
        check_finite(
            loss,
            "recover",
            it,
            "Lower recover.lr (or the objective's weights, e.g. recover.bn_matching.r_bn or recover.deda.gamma).",
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(*bounds)  # keep pixels inside the image range [0, 1] before normalisation
        on_step(it, loss, parts, schedule.get_last_lr()[0])
        losses.append(loss.item())
    warn_if_stuck(losses, x.detach(), bounds)
    return x.detach()


def optimise_groups(
    objective: SRe2LObjective,
    x0: list[torch.Tensor],
    labels: list[torch.Tensor],
    rcfg,
    augment,
    resolution: int,
    bounds: tuple[torch.Tensor, torch.Tensor],
    generators: list[torch.Generator],
    on_step,
) -> list[torch.Tensor]:
    """optimise_batch of G equal-size groups as one stacked problem; returns each group's last iterate.
    Group g draws its augmentations from generators[g], exactly as it would alone."""
    groups = len(x0)
    x = torch.cat(x0).requires_grad_(True)
    y = torch.cat(labels)
    optimizer = torch.optim.Adam([x], lr=rcfg.lr, betas=tuple(rcfg.betas))
    iterations = rcfg.iterations
    schedule = make_schedule(optimizer, rcfg, iterations)
    losses = []
    for it in range(iterations):
        params = [
            sample_params(len(lab), augment, resolution, gen) for lab, gen in zip(labels, generators, strict=True)
        ]
        group_losses, parts = objective.per_group(apply_groups(x, params), y, groups, it, iterations)
        loss = group_losses.sum()  # a sum, not a mean: each group's gradient is its own loss's
        check_finite(
            loss,
            "recover",
            it,
            "Lower recover.lr (or recover.bn_matching.r_bn).",
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(*bounds)
        # logged as one group's loss (the mean over the groups), comparable with groups run one at a time
        on_step(it, group_losses.mean(), {k: v.mean() for k, v in parts.items()}, schedule.get_last_lr()[0], groups)
        losses.append(group_losses.detach())
    per_group = torch.stack(losses).T.tolist()
    images = x.detach().chunk(groups)
    for group_losses_g, images_g in zip(per_group, images, strict=True):
        warn_if_stuck(group_losses_g, images_g, bounds)
    return list(images)


def stacks(todo: list[int], sizes: list[int], most: int) -> list[list[int]]:
    """`todo` in stacks of at most `most` groups of one batch size (a stack needs equal groups):
    each group joins the open stack of its size, which runs once full (the rest at the end), so
    most=1 keeps the order of `todo`."""
    runs: list[list[int]] = []
    open_stacks: dict[int, list[int]] = {}
    for g in todo:
        stack = open_stacks.setdefault(sizes[g], [])
        stack.append(g)
        if len(stack) == most:
            runs.append(open_stacks.pop(sizes[g]))
    return runs + list(open_stacks.values())


# Settings that run but cannot be meant: at most this share of pixels on the clamp bounds ...
CLAMPED_SHARE = 0.5
# ... and the loss of the last tenth of the iterations below that of the first tenth.


def warn_if_stuck(losses: list[float], x: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> list[str]:
    """Warn (and return the warnings) when a batch's recover loss never decreased or most of its
    pixels sit on the clamp bounds: both mean the pixels did not really get optimised."""
    problems = []
    tenth = max(len(losses) // 10, 1)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    if len(losses) >= 10 and last >= first:
        problems.append(f"the recover loss did not decrease (first tenth {first:.4g}, last tenth {last:.4g})")
    low, high = bounds
    clamped = ((x <= low) | (x >= high)).float().mean().item()
    if clamped > CLAMPED_SHARE:
        problems.append(f"{100 * clamped:.0f}% of the pixels sit on the clamp bounds of the image range")
    for problem in problems:
        warn(
            f"recover: {problem}. Check recover.lr (lower it) and the loss weights (recover.deda.*, "
            "recover.bn_matching.r_bn); the set is written, but its images are unlikely to be useful."
        )
    return problems


def recover_key(cfg: DictConfig) -> dict:
    """Exactly what determines the recovered set: the data, the teacher, the recover settings, ipc and seed.
    batch.parallel_groups is left out at 1, so work directories made before the option stay valid; stacked
    groups differ from sequential ones by float rounding, so any other value keys its own set. Likewise
    dataset.augment.*.crop_draw is left out where it changes no draw (per_image, or nothing to crop or flip)."""
    recover_settings = to_plain(cfg.recover)
    if recover_settings["batch"].get("parallel_groups") == 1:
        del recover_settings["batch"]["parallel_groups"]
    dataset = to_plain(cfg.dataset)
    dataset["augment"] = dataset_augment_key(dataset["augment"])
    return {
        "dataset": dataset,
        "teacher": teacher_identity(cfg),
        "recover": recover_settings,
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
    }


def group_generator(seed: int, group: int) -> torch.Generator:
    """The generator of one batch group, from (seed, group) alone: a group's initial noise and
    augmentations do not depend on which groups ran before it in this process."""
    state = np.random.SeedSequence([seed, group]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def run(cfg: DictConfig, ctx: RunContext) -> RunContext:
    spec, rcfg = ctx.spec, cfg.recover
    seed_everything(cfg.seed)
    labels = torch.arange(spec.num_classes).repeat_interleave(cfg.ipc)
    groups = batch_groups(spec.num_classes, cfg.ipc, rcfg.batch.mode, rcfg.batch.size)
    meta = {
        "dataset": spec.name,
        "method": rcfg.objective,
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "config": {"recover": to_plain(rcfg), "teacher": to_plain(cfg.teacher)},
    }
    plan = {"labels": labels.tolist(), "dataset": to_plain(cfg.dataset), "meta": meta}
    work = WorkDir(cfg, "recover", recover_key(cfg), "groups", len(groups), plan)
    return make_set(cfg, ctx, work, lambda todo: recover_groups(cfg, ctx, work, groups, labels, todo))


def recover_groups(
    cfg: DictConfig, ctx: RunContext, work: WorkDir, groups: list[torch.Tensor], labels: torch.Tensor, todo: list[int]
) -> None:
    """Optimise the groups `todo`, saving each to the work directory as soon as it is done."""
    spec, device, logger, rcfg = ctx.spec, ctx.device, ctx.logger, cfg.recover
    teacher = load_teacher(cfg, ctx)
    objective = build_objective(cfg, ctx, teacher)
    real = real_init(cfg, spec) if rcfg.init == "real" else None
    bounds = pixel_bounds(spec, device)
    augment = OmegaConf.to_container(cfg.dataset.augment.recover, resolve=True, enum_to_str=True)
    bar = progress(desc=f"recover ({rcfg.objective})", total=len(todo) * rcfg.iterations)

    def on_step(it: int, loss: torch.Tensor, parts: dict, lr: float, groups: int = 1) -> None:
        bar.update(groups)
        if it % rcfg.log_every == 0 or it == rcfg.iterations - 1:
            logger.log(
                {"recover/loss": loss.item(), "recover/lr": lr, **{f"recover/{k}": v.item() for k, v in parts.items()}}
            )
            bar.set_postfix(loss=f"{loss.item():.4f}")

    def start(g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Group g's starting pixels, labels and generator (drawn from first, as each group alone)."""
        idx = groups[g]
        generator = group_generator(int(cfg.seed), g)
        x0 = initial_images(spec, len(idx), generator) if real is None else real(idx)
        return x0.to(device), labels[idx].to(device), generator

    def done(g: int, images: torch.Tensor) -> None:
        work.save(g, images.cpu(), groups[g])
        info(f"recover batch {g + 1}/{len(groups)} done ({len(groups[g])} images, {rcfg.iterations} iterations)")

    try:
        for stack in stacks(todo, [len(idx) for idx in groups], rcfg.batch.parallel_groups):
            starts = [start(g) for g in stack]
            if len(stack) == 1:  # one group: the loop of one batch, as without parallel_groups
                x0, y, generator = starts[0]
                images = [optimise_batch(objective, x0, y, rcfg, augment, spec.resolution, bounds, generator, on_step)]
            else:
                if not isinstance(objective, SRe2LObjective):
                    raise ConfigError(
                        f"recover.batch.parallel_groups={rcfg.batch.parallel_groups} needs recover.objective=sre2l "
                        "(its BN statistics are taken per stacked group); set recover.batch.parallel_groups=1."
                    )
                x0s, ys, generators = (list(part) for part in zip(*starts, strict=True))
                images = optimise_groups(
                    objective, x0s, ys, rcfg, augment, spec.resolution, bounds, generators, on_step
                )
            for g, images_g in zip(stack, images, strict=True):
                done(g, images_g)
    finally:
        objective.close()
        bar.close()
