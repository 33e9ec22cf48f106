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
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from ddist.artifacts import atomic_save_tensors, cache_entry, load_tensors, save_distilled, to_plain
from ddist.data import load_split
from ddist.data.augment import apply, sample_params
from ddist.data.subsets import pick_random_real
from ddist.errors import ConfigError
from ddist.logging import info, progress, warn
from ddist.objectives import ClassMomentSums, DEDAObjective, SRe2LObjective
from ddist.teacher import deda_layers, load_teacher, teacher_key
from ddist.train import check_finite, make_schedule, seed_everything

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


def initial_images(cfg: DictConfig, spec, generator: torch.Generator) -> torch.Tensor:
    """Class-major starting images [C * IPC, C, H, W] in normalised space."""
    shape = (spec.num_classes * cfg.ipc, spec.channels, spec.resolution, spec.resolution)
    if cfg.recover.init == "noise":
        return torch.randn(shape, generator=generator)
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    idx = pick_random_real(train, spec.num_classes, cfg.ipc, cfg.seed)
    return torch.stack([train[int(i)][0] for i in idx])


# ----------------------------------------------------------------------------- real class statistics


def class_stats_key(cfg: DictConfig, layers: list[str]) -> dict:
    """What determines the real class statistics: the teacher (its cache key, or the bytes of a
    given checkpoint), the real data it saw, and the layers."""
    key = {"teacher": teacher_key(cfg), "layers": layers}
    if cfg.teacher.checkpoint:
        key["checkpoint_sha256"] = hashlib.sha256(Path(cfg.teacher.checkpoint).read_bytes()).hexdigest()
    return key


def class_sorted_batches(ds, spec, batch_size: int, num_workers: int = 0):
    """Normalised real batches in label order, so each batch holds few classes (cheap reductions)."""
    order = torch.sort(ds.targets, stable=True).indices
    if getattr(ds, "images", None) is None:  # decoded from files: let loader workers do it
        yield from DataLoader(Subset(ds, order.tolist()), batch_size=batch_size, num_workers=num_workers)
        return
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield spec.normalize(ds.images[idx].float() / 255), ds.targets[idx]


@torch.no_grad()
def real_class_stats(
    teacher, batches, num_classes: int, layers: list[str], device: torch.device, total: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (mean [C, d], cov [C, d, d])} of the teacher's features over real batches:
    one forward per batch, per-class sums accumulated by index_add (ClassMomentSums)."""
    sums = None
    for x, y in progress(batches, desc="recover: real class statistics", total=total):
        _, feats = teacher.forward_features(x.to(device))
        if sums is None:
            sums = ClassMomentSums(num_classes, {k: feats[k].shape[1] for k in layers}, device)
        sums.update(feats, y.to(device))
    assert sums is not None, "no real batches"
    return sums.moments()


def load_class_stats(cfg: DictConfig, ctx: dict, teacher, layers: list[str]) -> dict:
    """The cached real class statistics for this teacher and these layers (computed on a miss)."""
    entry = cache_entry(cfg, "class_stats", class_stats_key(cfg, layers))
    path = entry / "class_stats.safetensors"
    if not path.exists():
        train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
        batch_size = cfg.recover.deda.stats_batch_size
        batches = class_sorted_batches(train, ctx["spec"], batch_size, cfg.teacher.num_workers)
        stats = real_class_stats(
            teacher,
            batches,
            ctx["spec"].num_classes,
            layers,
            ctx["device"],
            total=math.ceil(len(train.targets) / batch_size),
        )
        atomic_save_tensors(
            path, {f"{k}.{part}": t for k, pair in stats.items() for part, t in zip(("mean", "cov"), pair, strict=True)}
        )
        info(f"real class statistics for {layers} cached at {path}")
    tensors = load_tensors(path, what="real class statistics")
    ctx["class_stats"] = path
    return {k: (tensors[f"{k}.mean"].to(ctx["device"]), tensors[f"{k}.cov"].to(ctx["device"])) for k in layers}


# ----------------------------------------------------------------------------- setup


def build_objective(cfg: DictConfig, ctx: dict, teacher):
    rcfg = cfg.recover
    if rcfg.objective == "sre2l":
        objective = SRe2LObjective(teacher, ce_weight=rcfg.ce_weight, **rcfg.bn_matching)
        if objective.num_bn_layers == 0:
            objective.close()
            raise ConfigError(
                "recover.objective=sre2l matches BatchNorm statistics, but the teacher has no "
                "BatchNorm2d layer; use a teacher with teacher.model.norm=batch (or recover=deda)."
            )
        return objective
    dcfg = rcfg.deda
    layers = deda_layers(cfg, teacher)
    real = load_class_stats(cfg, ctx, teacher, layers)
    return DEDAObjective(
        teacher,
        real,
        cfg.ipc,
        mean_weight=dcfg.mean_weight,
        gamma=dcfg.gamma,
        lambda_diag=dcfg.lambda_diag,
        lambda_offdiag=dcfg.lambda_offdiag,
        reg_iterations=dcfg.reg_iterations,
        reg_normalisation=dcfg.reg_normalisation,
        class_reduction=dcfg.class_reduction,
        ce_weight=rcfg.ce_weight,
    )


# ----------------------------------------------------------------------------- the loop


def optimise_batch(
    objective,
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


def run(cfg: DictConfig, ctx: dict) -> dict:
    spec, device, logger, rcfg = ctx["spec"], ctx["device"], ctx["logger"], cfg.recover
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    teacher = load_teacher(cfg, ctx)
    objective = build_objective(cfg, ctx, teacher)

    # the whole set stays on the CPU (ImageNet-scale sets do not fit a GPU); batches move over
    images = initial_images(cfg, spec, generator)
    labels = torch.arange(spec.num_classes).repeat_interleave(cfg.ipc)
    groups = batch_groups(spec.num_classes, cfg.ipc, rcfg.batch.mode, rcfg.batch.size)
    bounds = pixel_bounds(spec, device)
    augment = OmegaConf.to_container(cfg.dataset.augment.recover, resolve=True, enum_to_str=True)
    bar = progress(desc=f"recover ({rcfg.objective})", total=len(groups) * rcfg.iterations)

    def on_step(it: int, loss: torch.Tensor, parts: dict, lr: float) -> None:
        bar.update(1)
        if it % rcfg.log_every == 0 or it == rcfg.iterations - 1:
            logger.log(
                {"recover/loss": loss.item(), "recover/lr": lr, **{f"recover/{k}": v.item() for k, v in parts.items()}}
            )
            bar.set_postfix(loss=f"{loss.item():.4f}")

    try:
        for g, idx in enumerate(groups):
            images[idx] = optimise_batch(
                objective,
                images[idx].to(device),
                labels[idx].to(device),
                rcfg,
                augment,
                spec.resolution,
                bounds,
                generator,
                on_step,
            ).cpu()
            info(f"recover batch {g + 1}/{len(groups)} done ({len(idx)} images, {rcfg.iterations} iterations)")
    finally:
        objective.close()
        bar.close()

    ctx["distilled"] = save_distilled(
        Path(ctx["run_dir"]) / "distilled",
        images,
        labels,
        spec,
        {
            "dataset": spec.name,
            "method": rcfg.objective,
            "ipc": cfg.ipc,
            "seed": cfg.seed,
            "config": {"recover": to_plain(rcfg), "teacher": to_plain(cfg.teacher)},
        },
    )
    return ctx
