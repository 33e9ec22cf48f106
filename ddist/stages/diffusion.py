"""Diffusion stage: a class-conditional diffusion model generates the distilled set.

    base model   pretrained (diffusion.model.pretrained, from_pretrained; its architecture with
                 random weights when diffusion.model.random_weights) or trained from scratch
                 on the real train split (diffusion.train), cached
    fine-tune    diffusion.finetune.objective: none | plain | minimax | rsm, cached
    class means  real clean latents per class, for CGS's distribution matching, cached
    sample       diffusion.sample.method: independent | cgs, IPC images per class
    save         decode (VAE for latent models), resize to the dataset resolution,
                 clip, write a DistilledSet; ctx.distilled = its path; with a teacher
                 (squeeze ran first), its accuracy on the samples goes to results.json
                 (diffusion.teacher_acc_on_samples), a fidelity check for fine-tuning and guidance

The library below the recipe: ddist/diffusion/ (cache keys, loading or training the denoiser
and the class means, the sampler and decoding) and ddist/training/denoiser.py (the training loop).

Models and means are cached under ${paths.cache_dir}/<kind>/<hash> keyed by
exactly the config that made them, so sweeps over `seed`, `ipc` or the
sampling options train nothing twice.

Sampling is resumable and shardable (ddist/runtime/workdir.py): the sampling groups (batches of
images, or whole classes for CGS) go to ${paths.cache_dir}/diffusion_sample/<hash of the
model key, sampling settings, ipc, seed> as each is decoded; a rerun samples only the
missing groups (each image has its own generator, so a group does not depend on the
others), a finished set is reused without loading the model, and `shard.index` /
`shard.count` split the groups among jobs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ddist.config.schema import Config, DiffusionConfig
from ddist.data import load_split
from ddist.diffusion.keys import sample_key
from ddist.diffusion.load import class_means, load_denoiser
from ddist.diffusion.sampling import (
    CgsReference,
    GroupRows,
    decode,
    make_scheduler,
    sample_group,
    sample_groups,
    samples_accuracy,
    teacher_features,
)
from ddist.logging import info
from ddist.methods import diffusion_method
from ddist.runtime.artifacts import to_plain
from ddist.runtime.context import RunContext
from ddist.runtime.stages import Stage
from ddist.runtime.workdir import WorkDir, iter_images, make_set
from ddist.training.teacher import load_teacher

STAGE = Stage(name="diffusion", makes=frozenset({"distilled"}), shared=True)

__all__ = ["run"]


def run(cfg: Config, ctx: RunContext) -> RunContext:
    dcfg: DiffusionConfig = cfg.diffusion  # validated against its option's schema (diffusion/pixel_schema, ...)
    scfg = dcfg.sample
    spec = ctx.spec
    labels = torch.arange(spec.num_classes).repeat_interleave(cfg.ipc)
    groups = sample_groups(labels, scfg)
    ctx.method = diffusion_method(dcfg.finetune.objective, scfg.method)  # results.json's too
    meta = {
        "dataset": spec.name,
        "method": ctx.method,
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
        "config": {"diffusion": to_plain(dcfg)},
    }
    plan = {"labels": labels.tolist(), "dataset": to_plain(cfg.dataset), "meta": meta}
    work = WorkDir(cfg, "diffusion_sample", sample_key(cfg, dcfg), "groups", len(groups), plan)
    info(f"diffusion: {len(labels)} images in {len(groups)} groups ({scfg.method}, {scfg.steps} steps)")
    ctx = make_set(cfg, ctx, work, lambda todo: sample_parts(cfg, dcfg, ctx, work, labels, groups, todo))
    if ctx.distilled is not None and ctx.teacher is not None:  # a fidelity check of fine-tuning and guidance
        acc = samples_accuracy(load_teacher(cfg, ctx), iter_images(ctx.distilled, scfg.batch_size), labels, ctx.device)
        ctx.results["diffusion"] = {"teacher_acc_on_samples": acc}
        info(f"diffusion: teacher accuracy on the samples {acc:.4f}")
    return ctx


def sample_parts(
    cfg: Config,
    dcfg: DiffusionConfig,
    ctx: RunContext,
    work: WorkDir,
    labels: torch.Tensor,
    groups: list,
    todo: list[int],
) -> None:
    """Load (or train) the model, then sample, decode and save the groups `todo`, each as soon as it is done."""
    spec, device = ctx.spec, ctx.device
    train_set = functools.cache(lambda: load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir)))
    denoiser, codec, image_size = load_denoiser(cfg, dcfg, ctx, train_set)
    scfg = dcfg.sample
    cgs = scfg.method == "cgs"
    means = class_means(cfg, dcfg, codec, train_set, spec, image_size, device) if cgs else None
    teacher = load_teacher(cfg, ctx) if ctx.teacher is not None else None
    features = teacher_features(teacher, codec, spec) if cgs and teacher is not None else None
    scheduler = make_scheduler(dcfg.schedule, str(scfg.scheduler))
    reference = CgsReference(means, features) if means is not None else None
    for n, g in enumerate(todo):
        group = GroupRows(groups[g], f"sample group {g + 1}/{len(groups)}")
        z = sample_group(denoiser, scheduler, labels, group, int(cfg.seed), scfg, device, reference)
        work.save(g, decode(codec, z, spec, scfg.batch_size), groups[g])
        info(f"diffusion: sampled group {g + 1}/{len(groups)} ({n + 1}/{len(todo)} of this run)")
