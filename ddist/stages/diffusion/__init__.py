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

Models and means are cached under ${paths.cache_dir}/<kind>/<hash> keyed by
exactly the config that made them, so sweeps over `seed`, `ipc` or the
sampling options train nothing twice.

Sampling is resumable and shardable (ddist/workdir.py): the sampling groups (batches of
images, or whole classes for CGS) go to ${paths.cache_dir}/diffusion_sample/<hash of the
model key, sampling settings, ipc, seed> as each is decoded; a rerun samples only the
missing groups (each image has its own generator, so a group does not depend on the
others), a finished set is reused without loading the model, and `shard.index` /
`shard.count` split the groups among jobs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from ddist.artifacts import atomic_dir, atomic_save_tensors, building, cache_entry, load_tensors, to_plain
from ddist.context import RunContext
from ddist.data import load_split
from ddist.data.augment import resize
from ddist.data.spec import without_unset_val
from ddist.logging import info
from ddist.models import FeatureModel
from ddist.models.diffusion import (
    fresh_denoiser,
    make_codec,
    model_image_size,
    pretrained_denoiser,
    saved_denoiser,
    to_signed,
)
from ddist.stages.diffusion.sampling import make_scheduler, sample_group, sample_groups
from ddist.stages.diffusion.train import train_denoiser
from ddist.teacher import load_teacher, teacher_identity
from ddist.train import real_batches
from ddist.workdir import WorkDir, iter_images, make_set

__all__ = ["run"]

# dataset keys that do not change what a diffusion model learns
_NOT_DATA_KEYS = ("protocol", "download", "augment")
# training keys that do not change the trained weights
_NOT_WEIGHT_KEYS = ("checkpoint_every",)
# The latent (DiT) training loop's revision, in the keys of the models it trains (and so of their
# samples): 2 = the label dropped once per sample by the loop (each DiT block drew its own before)
# and DiffFit as MiniMax's (DitDiffFit: embedders tied, DiffFit scales, adaLN weights frozen);
# absent = before. The pixel models' keys do not have it: their training did not change.
LATENT_TRAINING_REVISION = 2


def run(cfg: DictConfig, ctx: RunContext) -> RunContext:
    dcfg = cast("dict[str, Any]", OmegaConf.to_container(cfg.diffusion, resolve=True, enum_to_str=True))
    spec = ctx.spec
    labels = torch.arange(spec.num_classes).repeat_interleave(cfg.ipc)
    groups = sample_groups(labels, dcfg["sample"])
    meta = {
        "dataset": spec.name,
        "method": cfg.pipeline.name,
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
        "config": {"diffusion": dcfg},
    }
    plan = {"labels": labels.tolist(), "dataset": to_plain(cfg.dataset), "meta": meta}
    work = WorkDir(cfg, "diffusion_sample", sample_key(cfg, dcfg), "groups", len(groups), plan)
    info(
        f"diffusion: {len(labels)} images in {len(groups)} groups ({dcfg['sample']['method']}, "
        f"{dcfg['sample']['steps']} steps)"
    )
    ctx = make_set(cfg, ctx, work, lambda todo: sample_parts(cfg, dcfg, ctx, work, labels, groups, todo))
    if ctx.distilled is not None and ctx.teacher is not None:  # a fidelity check of fine-tuning and guidance
        batch_size = dcfg["sample"]["batch_size"]
        acc = samples_accuracy(load_teacher(cfg, ctx), iter_images(ctx.distilled, batch_size), labels, ctx.device)
        ctx.results["diffusion"] = {"teacher_acc_on_samples": acc}
        info(f"diffusion: teacher accuracy on the samples {acc:.4f}")
    return ctx


def sample_key(cfg: DictConfig, dcfg: dict) -> dict:
    """Exactly what determines the sampled set: the model (base and fine-tuning), the sampling
    settings, ipc, seed, the pipeline (meta.json's method) and, for CGS's teacher kernel, the teacher."""
    model: dict[str, Any] = {"base": _base_key(cfg, dcfg)}
    if dcfg["finetune"]["objective"] != "none":
        model["finetune"] = {**_with_set_schedule(dcfg["finetune"]), **_revision(dcfg["backbone"])}
    key = {"model": model, "sample": _sample_settings_key(dcfg["sample"]), "ipc": int(cfg.ipc), "seed": int(cfg.seed)}
    key["pipeline"] = cfg.pipeline.name
    if dcfg["sample"]["method"] == "cgs" and dcfg["sample"]["cgs"]["kernel"] == "teacher":
        key["teacher"] = teacher_identity(cfg)
    return key


def _sample_settings_key(scfg: dict) -> dict:
    """diffusion.sample as a cache key: CGS's step size and window written as before those options
    (no step_norm or max_step, window start 0 and end null) when they change nothing, so the keys
    of sets sampled before them stay valid."""
    cgs = dict(scfg["cgs"])
    if cgs["step_norm"] == "none":
        del cgs["step_norm"], cgs["max_step"]
    if (cgs["start"], cgs["end"]) == (0, 1):
        cgs["start"], cgs["end"] = 0, None
    return {**scfg, "cgs": cgs}


def sample_parts(
    cfg: DictConfig, dcfg: dict, ctx: RunContext, work: WorkDir, labels: torch.Tensor, groups: list, todo: list[int]
) -> None:
    """Load (or train) the model, then sample, decode and save the groups `todo`, each as soon as it is done."""
    spec, device = ctx.spec, ctx.device
    train_set = functools.cache(lambda: load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir)))
    denoiser, codec, image_size = load_denoiser(cfg, dcfg, ctx, train_set)
    cgs = dcfg["sample"]["method"] == "cgs"
    means = class_means(cfg, dcfg, codec, train_set, spec, image_size, device) if cgs else None
    teacher = load_teacher(cfg, ctx) if ctx.teacher is not None else None
    features = teacher_features(teacher, codec, spec) if cgs and teacher is not None else None
    scheduler = make_scheduler(dcfg["schedule"], dcfg["sample"]["scheduler"])
    for n, g in enumerate(todo):
        z = sample_group(denoiser, scheduler, labels, groups[g], int(cfg.seed), dcfg["sample"], device, means, features)
        work.save(g, decode(codec, z, spec, dcfg["sample"]["batch_size"]), groups[g])
        info(f"diffusion: sampled group {g + 1}/{len(groups)} ({n + 1}/{len(todo)} of this run)")


def load_denoiser(cfg: DictConfig, dcfg: dict, ctx: RunContext, train_set):
    """The denoiser to sample from (base model, fine-tuned when asked; each cached), its codec and image size.
    train_set() gives the real train split (loaded only when a model is trained here)."""
    spec, device, logger = ctx.spec, ctx.device, ctx.logger
    image_size = model_image_size(dcfg, spec.resolution)
    cgs = dcfg["sample"]["method"] == "cgs"
    codec = make_codec(dcfg, spec.channels, need_encoder=_trains(dcfg) or cgs)
    train_scheduler = make_scheduler(dcfg["schedule"], "ddpm")
    train = functools.partial(
        train_denoiser,
        codec=codec,
        spec=spec,
        scheduler=train_scheduler,
        image_size=image_size,
        device=device,
        logger=logger,
    )

    # base model (loaded or trained only when a model derived from it is not cached)
    base_key = _base_key(cfg, dcfg)
    if dcfg["model"]["pretrained"] is not None:

        def base():
            return pretrained_denoiser(dcfg, spec.num_classes, spec.channels, spec.resolution, codec)
    else:

        def base():
            return _cached_model(
                cfg,
                dcfg,
                "diffusion",
                base_key,
                spec,
                make=lambda: fresh_denoiser(dcfg, spec.num_classes, spec.channels, spec.resolution, codec),
                fit=lambda d, work: train(
                    d, ds=train_set(), tcfg=dcfg["train"], objective="plain", phase="train", work_dir=work
                ),
            )

    # fine-tune
    objective = dcfg["finetune"]["objective"]
    if objective == "none":
        denoiser = base()
    else:
        denoiser = _cached_model(
            cfg,
            dcfg,
            "diffusion_finetune",
            {"base": base_key, "finetune": _training_key(dcfg["finetune"], dcfg["backbone"])},
            spec,
            make=base,
            fit=lambda d, work: train(
                d, ds=train_set(), tcfg=dcfg["finetune"], objective=objective, phase="finetune", work_dir=work
            ),
        )
    denoiser.net.to(device).eval().requires_grad_(False)
    return denoiser, codec, image_size


def _trains(dcfg: dict) -> bool:
    """Whether real images must be encoded for training (from scratch or fine-tuning)."""
    return dcfg["model"]["pretrained"] is None or dcfg["finetune"]["objective"] != "none"


def data_key(cfg: DictConfig) -> dict:
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    # subset and val_per_class only when set, so the keys of models cached before the options stay valid
    dataset = without_unset_val(dataset)
    return {k: v for k, v in dataset.items() if k not in _NOT_DATA_KEYS and (k != "subset" or v)}


def _base_key(cfg: DictConfig, dcfg: dict) -> dict:
    """What determines the base model (architecture, schedule, and training when trained here) and the data.

    The data is part of the key even for a pretrained model: fine-tuning, keyed by this, reads it.
    """
    # random_weights only when set, so the keys of models cached before the option stay valid
    model = {k: v for k, v in dcfg["model"].items() if k != "random_weights" or v}
    key = {"backbone": dcfg["backbone"], "model": model, "schedule": dcfg["schedule"], "data": data_key(cfg)}
    if dcfg["model"]["pretrained"] is None:
        key["train"] = _training_key(dcfg["train"], dcfg["backbone"])
    return key


def _training_key(tcfg: dict, backbone: str) -> dict:
    """A train/finetune node as a cache key: without the keys that do not change the weights, with
    ema only when set and ema_schedule only when it is fixed (_with_set_schedule), so the keys of
    models cached before these options stay valid; with the latent loop's revision."""
    node = _with_set_schedule(tcfg)
    key = {k: v for k, v in node.items() if k not in _NOT_WEIGHT_KEYS and (k != "ema" or v is not None)}
    return {**key, **_revision(backbone)}


def _with_set_schedule(tcfg: dict) -> dict:
    """tcfg without ema_schedule where it changes nothing (no EMA) or is the schedule of before the
    option (warmup, diffusers' EMAModel)."""
    return {k: v for k, v in tcfg.items() if k != "ema_schedule" or (tcfg["ema"] is not None and v != "warmup")}


def _revision(backbone: str) -> dict:
    return {"revision": LATENT_TRAINING_REVISION} if backbone == "latent" else {}


def _cached_model(cfg, dcfg, kind, key, spec, make, fit):
    """The denoiser cached under <kind>/<hash(key)>; else make() one, fit(it, work_dir) (which
    checkpoints into and resumes from the entry), save it and return it."""
    with building(cache_entry(cfg, kind, key)) as work:
        entry = work / "denoiser"
        if (entry / "config.json").is_file():
            info(f"diffusion: using the cached model {entry}")
            return saved_denoiser(dcfg, str(entry), spec.num_classes, f"paths.cache_dir ({entry})")
        denoiser = make()
        fit(denoiser, work)
        with atomic_dir(entry) as tmp:
            denoiser.net.save_pretrained(tmp)
        return denoiser


@torch.no_grad()
def class_means(cfg, dcfg, codec, train_set, spec, image_size, device) -> torch.Tensor:
    """mu_real,0^c: the mean clean latent of each class over the real train split [K, C, h, w], cached."""
    key = {
        "data": data_key(cfg),
        "backbone": dcfg["backbone"],
        "codec": None
        if dcfg["backbone"] == "pixel"
        else {k: dcfg["model"][k] for k in ("vae", "vae_subfolder", "vae_config", "image_size")},
    }
    path = cache_entry(cfg, "diffusion_means", key) / "means.safetensors"
    if path.is_file():
        return load_tensors(path, "class mean latents")["means"]
    sums, counts = None, torch.zeros(spec.num_classes)
    for x, y in real_batches(train_set(), spec, dcfg["sample"]["batch_size"], shuffle=False):
        z = codec.encode(resize(to_signed(x, spec), image_size).to(device)).cpu()
        sums = torch.zeros(spec.num_classes, *z.shape[1:]) if sums is None else sums
        sums.index_add_(0, y, z)
        counts += torch.bincount(y, minlength=spec.num_classes)
    assert sums is not None, "the training split has no images"
    means = sums / counts.clamp(min=1).view(-1, 1, 1, 1)
    atomic_save_tensors(path, {"means": means})
    return means


def teacher_features(teacher: FeatureModel, codec, spec):
    """The teacher kernel's feature map: model-space clean estimates -> the teacher's penultimate
    (globally pooled) features of the images they decode to, differentiable.

    The decode is the stage's own (`decode` below: codec, resize, [-1, 1] -> dataset-normalised)
    without its clip. reading: unclipped, so pixels an early, overshooting x0_hat puts outside
    [0, 1] still get a gradient.
    """

    def features(x0_hat: torch.Tensor) -> torch.Tensor:
        x = resize(codec.decode(x0_hat).float(), spec.resolution)
        return teacher.forward_features(spec.normalize((x + 1) / 2))[1]["penultimate"]

    return features


@torch.no_grad()
def samples_accuracy(
    teacher: torch.nn.Module, batches: Iterable[torch.Tensor], labels: torch.Tensor, device: torch.device
) -> float:
    """Top-1 accuracy (a fraction) of the teacher on batches of dataset-normalised images with their intended labels."""
    preds = torch.cat([teacher(images.to(device)).argmax(1).cpu() for images in batches])
    return float((preds == labels).float().mean())


@torch.no_grad()
def decode(codec, z: torch.Tensor, spec, batch_size: int) -> torch.Tensor:
    """Latents -> images in the dataset's normalised space, at its resolution, clipped to [0, 1] pixels."""
    out = []
    for s in range(0, len(z), batch_size):
        x = resize(codec.decode(z[s : s + batch_size]).float(), spec.resolution)
        out.append(spec.normalize(((x + 1) / 2).clamp(0, 1)).cpu())
    return torch.cat(out)
