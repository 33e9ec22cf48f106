"""Diffusion stage: a class-conditional diffusion model generates the distilled set.

    base model   pretrained (diffusion.model.pretrained, from_pretrained; its architecture with
                 random weights when diffusion.model.random_weights) or trained from scratch
                 on the real train split (diffusion.train), cached
    fine-tune    diffusion.finetune.objective: none | plain | minimax | rsm, cached
    class means  real clean latents per class, for CGS's distribution matching, cached
    sample       diffusion.sample.method: independent | cgs, IPC images per class
    save         decode (VAE for latent models), resize to the dataset resolution,
                 clip, write a DistilledSet; ctx["distilled"] = its path; with a teacher
                 (squeeze ran first), its accuracy on the samples goes to results.json
                 (diffusion.teacher_acc_on_samples), a fidelity check for fine-tuning and guidance

Models and means are cached under ${paths.cache_dir}/<kind>/<hash> keyed by
exactly the config that made them, so sweeps over `seed`, `ipc` or the
sampling options train nothing twice.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from ddist.artifacts import (
    atomic_dir,
    atomic_save_tensors,
    cache_entry,
    load_tensors,
    save_distilled,
)
from ddist.data import load_split
from ddist.logging import info
from ddist.models import FeatureModel
from ddist.stages.diffusion.backbones import (
    fresh_denoiser,
    make_codec,
    model_image_size,
    pretrained_denoiser,
    resize,
    saved_denoiser,
    to_signed,
)
from ddist.stages.diffusion.sampling import make_scheduler, sample_latents
from ddist.stages.diffusion.train import train_denoiser
from ddist.teacher import load_teacher
from ddist.train import real_batches

__all__ = ["run"]

# dataset keys that do not change what a diffusion model learns
_NOT_DATA_KEYS = ("protocol", "download", "augment")


def run(cfg: DictConfig, ctx: dict) -> dict:
    dcfg = cast("dict[str, Any]", OmegaConf.to_container(cfg.diffusion, resolve=True, enum_to_str=True))
    spec, device, logger = ctx["spec"], ctx["device"], ctx["logger"]
    train_set = functools.cache(lambda: load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir)))
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
                fit=lambda d: train(d, ds=train_set(), tcfg=dcfg["train"], objective="plain", phase="train"),
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
            {"base": base_key, "finetune": dcfg["finetune"]},
            spec,
            make=base,
            fit=lambda d: train(d, ds=train_set(), tcfg=dcfg["finetune"], objective=objective, phase="finetune"),
        )
    denoiser.net.to(device).eval().requires_grad_(False)

    # sample
    means = class_means(cfg, dcfg, codec, train_set, spec, image_size, device) if cgs else None
    teacher = load_teacher(cfg, ctx) if "teacher" in ctx else None
    features = teacher_features(teacher, codec, spec) if cgs and teacher is not None else None
    labels = torch.arange(spec.num_classes).repeat_interleave(cfg.ipc)
    scheduler = make_scheduler(dcfg["schedule"], dcfg["sample"]["scheduler"])
    info(f"diffusion: sampling {len(labels)} images ({dcfg['sample']['method']}, {dcfg['sample']['steps']} steps)")
    z = sample_latents(
        denoiser,
        scheduler,
        labels,
        int(cfg.seed),
        dcfg["sample"],
        device,
        means,
        features,
        on_group=lambda g, n: info(f"diffusion: sampled group {g}/{n}"),
    )

    # save
    images = decode(codec, z, spec, dcfg["sample"]["batch_size"])
    if teacher is not None:
        acc = samples_accuracy(teacher, images, labels, device, dcfg["sample"]["batch_size"])
        ctx["results"]["diffusion"] = {"teacher_acc_on_samples": acc}
        info(f"diffusion: teacher accuracy on the samples {acc:.4f}")
    meta = {
        "dataset": spec.name,
        "method": cfg.pipeline.name,
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
        "config": {"diffusion": dcfg},
    }
    ctx["distilled"] = save_distilled(Path(ctx["run_dir"]) / "distilled", images, labels, spec, meta)
    return ctx


def _trains(dcfg: dict) -> bool:
    """Whether real images must be encoded for training (from scratch or fine-tuning)."""
    return dcfg["model"]["pretrained"] is None or dcfg["finetune"]["objective"] != "none"


def data_key(cfg: DictConfig) -> dict:
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    # subset only when set, so the keys of models cached before the option stay valid
    return {k: v for k, v in dataset.items() if k not in _NOT_DATA_KEYS and (k != "subset" or v)}


def _base_key(cfg: DictConfig, dcfg: dict) -> dict:
    """What determines the base model (architecture, schedule, and training when trained here) and the data.

    The data is part of the key even for a pretrained model: fine-tuning, keyed by this, reads it.
    """
    # random_weights only when set, so the keys of models cached before the option stay valid
    model = {k: v for k, v in dcfg["model"].items() if k != "random_weights" or v}
    key = {"backbone": dcfg["backbone"], "model": model, "schedule": dcfg["schedule"], "data": data_key(cfg)}
    if dcfg["model"]["pretrained"] is None:
        key["train"] = dcfg["train"]
    return key


def _cached_model(cfg, dcfg, kind, key, spec, make, fit):
    """The denoiser cached under <kind>/<hash(key)>; else make() one, fit it, save it and return it."""
    entry = cache_entry(cfg, kind, key) / "denoiser"
    if (entry / "config.json").is_file():
        info(f"diffusion: using the cached model {entry}")
        return saved_denoiser(dcfg, str(entry), spec.num_classes, f"paths.cache_dir ({entry})")
    denoiser = make()
    fit(denoiser)
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
    teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int
) -> float:
    """Top-1 accuracy (a fraction) of the teacher on dataset-normalised images with their intended labels."""
    preds = torch.cat(
        [teacher(images[s : s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(images), batch_size)]
    )
    return float((preds == labels).float().mean())


@torch.no_grad()
def decode(codec, z: torch.Tensor, spec, batch_size: int) -> torch.Tensor:
    """Latents -> images in the dataset's normalised space, at its resolution, clipped to [0, 1] pixels."""
    out = []
    for s in range(0, len(z), batch_size):
        x = resize(codec.decode(z[s : s + batch_size]).float(), spec.resolution)
        out.append(spec.normalize(((x + 1) / 2).clamp(0, 1)).cpu())
    return torch.cat(out)
