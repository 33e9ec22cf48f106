"""Recover's pixel optimisation (the stage's recipe: ddist/stages/recover.py): the batch layout,
what a method's objective builder is given (ddist/methods/), the loop (stacked groups, G >= 1, a
step function on ddist/training/engine.py) and its sanity warnings.

Batches (`recover.batch`): ipc_slice holds one image per class (per IPC index), as SRe2L's
reference; whole_class holds all IPC images of its classes, which DEDA's per-class statistics
need. Each batch is optimised for `iterations` steps: Adam (betas), cosine (or constant) lr, a
fresh random augmentation of the batch every step, the teacher in eval mode, the objective, a
step, then the pixels clipped to the valid range of the normalised image.

Stacked groups (`batch.parallel_groups` G, SRe2L): up to G groups of one size run as one
problem, their pixels one leaf [G * B, C, H, W], one teacher forward, the BN statistics and
CE per group, the SUM of the groups' losses, one Adam. Adam, the clamp and the lr schedule
act elementwise and each group's pixels only reach its own loss, so every group gets the
steps it would get alone (up to float rounding). One group alone is the same loop with G = 1,
the objective called on its batch as before (DEDA's objective, without per_group, runs only so).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ddist.config.schema import AnyConfig
from ddist.data.augment import apply_groups, sample_params
from ddist.logging import warn
from ddist.models import FeatureModel
from ddist.objectives import RecoverObjective, SRe2LObjective
from ddist.runtime.context import RunContext
from ddist.training.class_stats import class_stats_layers, load_class_stats
from ddist.training.engine import ClampPixels, Log, Loop, Optim, run_loop
from ddist.training.loop import make_schedule
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


def objective_inputs(needs: frozenset[str], cfg: AnyConfig, ctx: RunContext, teacher: FeatureModel) -> dict:
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


@dataclass
class PixelSpace:
    """Where recover's pixels live: augmented with `augment` (dataset.augment.recover) at `resolution`,
    clamped to `bounds` (pixel_bounds: the normalised image range)."""

    augment: Mapping
    resolution: int
    bounds: tuple[torch.Tensor, torch.Tensor]


@dataclass
class Group:
    """One batch group's start: its pixels x0 [B, C, H, W], labels [B] and generator (group_generator)."""

    x0: torch.Tensor
    labels: torch.Tensor
    generator: torch.Generator


def optimise_groups(
    objective: RecoverObjective | SRe2LObjective, groups: list[Group], rcfg, space: PixelSpace, on_step
) -> list[torch.Tensor]:
    """Optimise G >= 1 equal-size groups as one stacked problem for `rcfg.iterations` steps (engine.py's
    loop); returns each group's last iterate. Group g draws its augmentations from its own generator,
    exactly as it would alone. on_step(it, loss, parts, lr, groups) sees one group's loss (the mean)."""
    n = len(groups)
    x = torch.cat([g.x0 for g in groups]).requires_grad_(True)
    y = torch.cat([g.labels for g in groups])
    optimizer = torch.optim.Adam([x], lr=rcfg.lr, betas=tuple(rcfg.betas))
    iterations = rcfg.iterations
    optim = Optim(optimizer, [x], make_schedule(optimizer, rcfg, iterations))
    per_group = _per_group(objective, n)
    history: list[torch.Tensor] = []

    def step_fn(it: int, _: None) -> tuple[torch.Tensor, dict]:
        params = [sample_params(len(g.labels), space.augment, space.resolution, g.generator) for g in groups]
        group_losses, parts = per_group(apply_groups(x, params), y, n, it, iterations)
        history.append(group_losses.detach())
        return group_losses.sum(), parts  # a sum, not a mean: each group's gradient is its own loss's

    def report(done: int, loss: torch.Tensor, parts: Mapping) -> None:
        # logged as one group's loss (the mean over the groups), comparable with groups run one at a time
        on_step(done - 1, history[-1].mean(), {k: v.mean() for k, v in parts.items()}, optim.lr(), n)

    hint = "Lower recover.lr (or the objective's weights, e.g. recover.bn_matching.r_bn or recover.deda.gamma)."
    loop = Loop(iterations, desc="recover", stage="recover", hint=hint, bar=False)  # the stage shows one bar
    run_loop(step_fn, itertools.repeat(None), optim, [ClampPixels(x, space.bounds), Log(1, iterations, report)], loop)
    images = x.detach().chunk(n)
    for losses_g, images_g in zip(torch.stack(history).T.tolist(), images, strict=True):
        warn_if_stuck(losses_g, images_g, space.bounds)
    return list(images)


def _per_group(objective, groups: int):
    """What gives the G groups' losses [G] and parts [G]: the objective's per_group for stacked groups;
    for one group (and for an objective without per_group, DEDA's) its plain call as a group of one,
    so G = 1 computes exactly what one batch alone always did (no cached set changes)."""
    if groups > 1:
        return objective.per_group

    def one(images, labels, groups, it, iterations):
        loss, parts = objective(images, labels, it, iterations)
        return loss.reshape(1), {k: v.reshape(1) for k, v in parts.items()}

    return one


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
