"""Recover's pixel optimisation (the stage's recipe: ddist/stages/recover.py): the batch layout,
what a method's objective builder is given (ddist/methods/), the loop of one batch and of stacked
groups, and its sanity warnings.

Batches (`recover.batch`): ipc_slice holds one image per class (per IPC index), as SRe2L's
reference; whole_class holds all IPC images of its classes, which DEDA's per-class statistics
need. Each batch is optimised on its own for `iterations` steps: Adam (betas), cosine (or
constant) lr, a fresh random augmentation of the batch every step, the teacher in eval mode,
the objective, a step, then the pixels clipped to the valid range of the normalised image.

Stacked groups (`batch.parallel_groups` G > 1, SRe2L): up to G groups of one size run as one
problem, their pixels one leaf [G * B, C, H, W], one teacher forward, the BN statistics and
CE per group, the SUM of the groups' losses, one Adam. Adam, the clamp and the lr schedule
act elementwise and each group's pixels only reach its own loss, so every group gets the
steps it would get alone (up to float rounding).
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from ddist.data.augment import apply, apply_groups, sample_params
from ddist.logging import warn
from ddist.models import FeatureModel
from ddist.objectives import RecoverObjective, SRe2LObjective
from ddist.runtime.context import RunContext
from ddist.training.class_stats import class_stats_layers, load_class_stats
from ddist.training.loop import check_finite, make_schedule
from ddist.training.teacher import frozen_teacher

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


# ----------------------------------------------------------------------------- setup


def objective_inputs(needs: frozenset[str], cfg: DictConfig, ctx: RunContext, teacher: FeatureModel) -> dict:
    """What a recover method's builder asks for by its needs (ddist/methods/base.py), as its keywords:
    teacher= (BatchNorm folded with teacher.fold_bn, unless it needs bn_hooks), class_stats= (the real
    class statistics at recover.class_stats.layers, cached), ipc= (with whole_class_batches)."""
    inputs: dict = {}
    if "class_stats" in needs:
        inputs["class_stats"] = load_class_stats(cfg, ctx, teacher, class_stats_layers(cfg, teacher.feature_names))
    if "teacher" in needs:
        inputs["teacher"] = teacher if "bn_hooks" in needs else frozen_teacher(cfg, teacher)
    if "whole_class_batches" in needs:
        inputs["ipc"] = int(cfg.ipc)
    return inputs


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


def group_generator(seed: int, group: int) -> torch.Generator:
    """The generator of one batch group, from (seed, group) alone: a group's initial noise and
    augmentations do not depend on which groups ran before it in this process."""
    state = np.random.SeedSequence([seed, group]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))
