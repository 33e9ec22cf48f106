"""The denoiser to sample from (pretrained, or trained here from scratch; fine-tuned when asked)
and the real class means CGS matches, each a store entry (ddist/runtime/store.py) keyed by
exactly the config that made it (ddist/diffusion/keys.py), so sweeps over `seed`, `ipc` or the
sampling options train nothing twice."""

from __future__ import annotations

from typing import Any, cast

import torch

from ddist.config.schema import AnyConfig, DiffusionConfig, LatentModelConfig
from ddist.data.augment import resize
from ddist.diffusion.keys import base_key, data_key, training_key
from ddist.diffusion.sampling import make_scheduler
from ddist.errors import ConfigError
from ddist.logging import info
from ddist.models.diffusion import (
    fresh_denoiser,
    make_codec,
    model_image_size,
    pretrained_denoiser,
    saved_denoiser,
    to_signed,
)
from ddist.runtime import store
from ddist.runtime.artifacts import atomic_dir, atomic_save_tensors, load_tensors, to_plain
from ddist.runtime.context import RunContext
from ddist.training.denoiser import Phase, TrainData, train_denoiser
from ddist.training.loop import real_batches


def load_denoiser(cfg: AnyConfig, dcfg: DiffusionConfig, ctx: RunContext, train_set):
    """The denoiser to sample from (base model, fine-tuned when asked; each cached), its codec and image size.
    train_set() gives the real train split (loaded only when a model is trained here)."""
    spec, device, logger = ctx.spec, ctx.device, ctx.logger
    image_size = model_image_size(dcfg, spec.resolution)
    cgs = dcfg.sample.method == "cgs"
    codec = make_codec(dcfg, spec.channels, need_encoder=trains(dcfg) or cgs)
    train_scheduler = make_scheduler(dcfg.schedule, "ddpm")

    def train(denoiser, phase: Phase, work_dir):
        data = TrainData(train_set(), spec, image_size)
        return train_denoiser(denoiser, codec, train_scheduler, data, phase, device, logger, work_dir)

    # base model (loaded or trained only when a model derived from it is not cached)
    base_model_key = base_key(cfg, dcfg)
    if dcfg.model.pretrained is not None:

        def base():
            return pretrained_denoiser(dcfg, spec.num_classes, spec.channels, spec.resolution, codec)
    else:

        def base():
            return cached_model(
                cfg,
                dcfg,
                "diffusion",
                base_model_key,
                spec,
                make=lambda: fresh_denoiser(dcfg, spec.num_classes, spec.channels, spec.resolution, codec),
                fit=lambda d, work: train(d, Phase("train", "plain", dcfg.train), work),
            )

    # fine-tune
    objective = dcfg.finetune.objective
    if objective == "none":
        denoiser = base()
    else:
        denoiser = cached_model(
            cfg,
            dcfg,
            "diffusion_finetune",
            {"base": base_model_key, "finetune": training_key(dcfg.finetune)},
            spec,
            make=base,
            fit=lambda d, work: train(d, Phase("finetune", objective, dcfg.finetune), work),
        )
    denoiser.net.to(device).eval().requires_grad_(False)
    return denoiser, codec, image_size


def trains(dcfg: DiffusionConfig) -> bool:
    """Whether real images must be encoded for training (from scratch or fine-tuning)."""
    return dcfg.model.pretrained is None or dcfg.finetune.objective != "none"


def cached_model(cfg, dcfg: DiffusionConfig, kind, key, spec, make, fit):
    """The denoiser cached under <kind>/<hash(key)> (a store entry, ddist/runtime/store.py); else make()
    one, fit(it, work_dir) (which checkpoints into and resumes from the entry), save it and return it."""
    trained = []

    def build(e: store.Entry) -> None:
        denoiser = make()
        fit(denoiser, e.path)
        with atomic_dir(e / "denoiser") as tmp:
            denoiser.net.save_pretrained(tmp)
        trained.append(denoiser)

    def read(e: store.Entry):
        if trained:
            return trained[0]
        info(f"diffusion: using the cached model {e / 'denoiser'}")
        try:
            return saved_denoiser(dcfg, str(e / "denoiser"), spec.num_classes, f"paths.cache_dir ({e.path})")
        except ConfigError as err:
            raise e.damaged(f"holds an unreadable denoiser ({str(err)[:200]})") from None

    return store.cached(store.entry(cfg, kind, key), build, read)


@torch.no_grad()
def class_means(cfg: AnyConfig, dcfg: DiffusionConfig, codec, train_set, spec, image_size, device) -> torch.Tensor:
    """mu_real,0^c: the mean clean latent of each class over the real train split [K, C, h, w], cached."""
    key = {"data": data_key(cfg), "backbone": str(dcfg.backbone), "codec": codec_key(dcfg)}

    def build(e: store.Entry) -> None:
        sums, counts = None, torch.zeros(spec.num_classes)
        for x, y in real_batches(train_set(), spec, dcfg.sample.batch_size, shuffle=False):
            z = codec.encode(resize(to_signed(x, spec), image_size).to(device)).cpu()
            sums = torch.zeros(spec.num_classes, *z.shape[1:]) if sums is None else sums
            sums.index_add_(0, y, z)
            counts += torch.bincount(y, minlength=spec.num_classes)
        assert sums is not None, "the training split has no images"
        atomic_save_tensors(e / "means.safetensors", {"means": sums / counts.clamp(min=1).view(-1, 1, 1, 1)})

    def read(e: store.Entry) -> torch.Tensor:
        means = load_tensors(e / "means.safetensors", "class mean latents").get("means")
        if means is None or means.ndim != 4 or len(means) != spec.num_classes:
            raise e.damaged(f"holds no [{spec.num_classes}, C, h, w] class means")
        return means

    return store.cached(store.entry(cfg, "diffusion_means", key), build, read)


def codec_key(dcfg: DiffusionConfig) -> dict[str, Any] | None:
    """What determines the latent codec (the class means' latent space): None for pixels."""
    if dcfg.backbone == "pixel":
        return None
    model = cast(LatentModelConfig, dcfg.model)  # backbone latent: diffusion/latent_schema
    return {
        "vae": model.vae,
        "vae_subfolder": model.vae_subfolder,
        "vae_config": to_plain(model.vae_config),
        "image_size": model.image_size,
    }
