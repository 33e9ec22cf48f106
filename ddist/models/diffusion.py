"""The class-conditional denoisers and image codecs the diffusion stage works with.

Two backbones, both from diffusers, registered in BACKBONES (diffusion.backbone):
- `pixel`: a UNet2DModel with a class-embedding table of num_classes + 1
  entries (the last one is the null class of classifier-free guidance),
  denoising images in [-1, 1] directly (digits, CIFAR).
- `latent`: a DiTTransformer2DModel denoising AutoencoderKL latents scaled by
  the VAE's `scaling_factor` (DiT-XL-2-256 with the SD VAEs for ImageNet
  subsets). DiT's label table has num_embeds_ada_norm + 1 entries, the last
  one being its null class; dataset labels map to the model's class ids
  through `diffusion.model.class_ids` (the ImageNet-1k ids of a subset).

Config nodes arrive as plain dicts (resolved once by the stage). Pretrained
weights come from `from_pretrained` (a hub id or a local
directory); without them a model is built from the config and trained from
scratch by the stage. Offline with no local copy the load fails with a
ConfigError naming the option to set. WeightAverage keeps the optional EMA of the
weights during training (diffusion.train.ema / diffusion.finetune.ema).

Imported only by the diffusion stage (diffusers is a heavy import): ddist.models does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel
from diffusers.training_utils import EMAModel

from ddist.errors import ConfigError


@dataclass
class Denoiser:
    """eps_theta(z_t, t, y) of one backbone, with its class-id mapping."""

    net: torch.nn.Module  # UNet2DModel | DiTTransformer2DModel
    latent_shape: tuple[int, int, int]
    class_ids: torch.Tensor  # [num_classes]: dataset label -> model class id
    null_id: int  # the model's unconditional class id
    drops_labels: bool  # DiT drops labels itself (10%) in train mode

    def eps(self, z: torch.Tensor, t: torch.Tensor, model_ids: torch.Tensor) -> torch.Tensor:
        """Predicted noise [B, C, h, w]; a learned-variance head (DiT) is dropped, as in diffusers' DiTPipeline."""
        timesteps = t.expand(z.shape[0]) if t.ndim == 0 else t
        out = self.net(z, timesteps, class_labels=model_ids).sample
        return out[:, : z.shape[1]]

    def model_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_ids.to(labels.device)[labels]


class PixelCodec:
    """Pixel-space models denoise the images themselves (in [-1, 1])."""

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class VaeCodec:
    """AutoencoderKL latents scaled by the VAE's scaling_factor (Rombach et al. 2022, Sec. 4.3.2)."""

    def __init__(self, encoder: AutoencoderKL | None, decoder: AutoencoderKL):
        self.encoder, self.decoder = encoder, decoder
        self.scale = float(decoder.config.scaling_factor)

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """x in [-1, 1] -> scaled latents: a posterior sample for training (as DiT does), its mean otherwise."""
        assert self.encoder is not None, "this codec was made without an encoder (need_encoder=False)"
        dist = self.encoder.encode(x).latent_dist
        return (dist.sample() if sample else dist.mode()) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(z / self.scale).sample


class WeightAverage:
    """An exponential moving average of a network's weights (diffusers' EMAModel), kept as DiT keeps
    one: updated after every optimiser step; `copy_to_net` puts the average into the network at the
    end, so the weights saved and sampled from are the average. decay None: off (no-ops).

    EMAModel's schedule: the first update copies the weights, the n-th (n >= 2) uses the decay
    min(decay, n / (n + 9)), so a short run does not keep its random initial weights.
    """

    def __init__(self, net: torch.nn.Module, decay: float | None, option: str):
        if decay is not None and not 0 < decay < 1:
            raise ConfigError(f"{option}={decay} must be a decay in (0, 1) (e.g. 0.9999), or null for no EMA.")
        self.net = net
        self.ema = None if decay is None else EMAModel(net.parameters(), decay=decay)

    def step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.net.parameters())

    def copy_to_net(self) -> None:
        if self.ema is not None:
            self.ema.copy_to(self.net.parameters())

    # a checkpoint keeps the average and its step, so a resumed run averages as an uninterrupted one
    def state_dict(self) -> dict:
        return {} if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state)


# ----------------------------------------------------------------------------- loading


def from_pretrained(cls, path: str, option: str, **kwargs):
    """`cls.from_pretrained(path)`, turning a missing download or directory into a ConfigError."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:  # hub, offline and missing-file errors all derive from these
        local = f"/local/{Path(path).name}"
        raise ConfigError(
            f"Cannot load the {cls.__name__} '{path}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"{option} takes a Hugging Face hub id (needs internet or the hub cache) or a local directory in the "
            f"diffusers layout: without internet, fetch a copy on a connected machine (`hf download {path} "
            f"--local-dir {local}`) and set {option}={local}."
        ) from None


def build_unet(model_cfg: Mapping, num_classes: int, channels: int, resolution: int) -> UNet2DModel:
    """A fresh UNet2DModel from `diffusion.model.unet` (class table num_classes + 1: the last id is null)."""
    try:
        return UNet2DModel(
            sample_size=resolution,
            in_channels=channels,
            out_channels=channels,
            num_class_embeds=num_classes + 1,
            **model_cfg["unet"],
        )
    except (ValueError, TypeError) as err:  # diffusers validates the block lists in its constructor
        raise ConfigError(
            f"diffusion.model.unet does not describe a UNet2DModel: {err} "
            "Give block_out_channels, down_block_types and up_block_types the same length."
        ) from None


def build_vae(model_cfg: Mapping, channels: int) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL from `diffusion.model.vae_config` (tests only).

    Seeded on its own, so every stage and process builds the same random VAE.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=channels, out_channels=channels, **model_cfg["vae_config"])


def build_dit(model_cfg: Mapping, num_classes: int, latent_channels: int, latent_size: int) -> DiTTransformer2DModel:
    """A fresh DiTTransformer2DModel from `diffusion.model.dit`, predicting eps and a variance like DiT.

    Its class table has `dit.num_embeds_ada_norm` entries (DiT-XL/2: ImageNet-1k's 1000) when
    given, else one per dataset class (plus DiT's null class either way).
    """
    args = dict(model_cfg["dit"])
    table = args.pop("num_embeds_ada_norm", None) or num_classes
    return DiTTransformer2DModel(
        in_channels=latent_channels,
        out_channels=2 * latent_channels,
        sample_size=latent_size,
        num_embeds_ada_norm=table,
        **args,
    )


def load_vae(model_cfg: Mapping, key: str, channels: int) -> AutoencoderKL:
    """The VAE named by diffusion.model.<key> (hub id or directory); a random one from vae_config when it
    is null or diffusion.model.random_weights is set."""
    path = model_cfg[key]
    random = path is None or model_cfg["random_weights"]
    vae = (
        build_vae(model_cfg, channels)
        if random
        else from_pretrained(AutoencoderKL, path, f"diffusion.model.{key}", subfolder=model_cfg["vae_subfolder"])
    )
    if vae.config.in_channels != channels:
        raise ConfigError(
            f"The VAE {path} takes {vae.config.in_channels}-channel images but the dataset has "
            f"{channels}; use the pixel backbone (diffusion=pixel) for this dataset."
        )
    return vae.requires_grad_(False).eval()


def vae_factor(vae: AutoencoderKL) -> int:
    """How much the VAE shrinks each side: one halving per encoder block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def class_id_map(model_cfg: Mapping, num_classes: int, table_size: int) -> torch.Tensor:
    """Dataset label -> model class id: diffusion.model.class_ids, or the identity when the model has our classes."""
    ids = model_cfg["class_ids"]
    if ids is None:
        if table_size != num_classes:
            raise ConfigError(
                f"The diffusion model knows {table_size} classes but the dataset has {num_classes}. "
                "Set diffusion.model.class_ids to the model's class id of each dataset label "
                "(dataset.imagenet_ids for ImageNet subsets)."
            )
        return torch.arange(num_classes)
    if len(ids) != num_classes or not all(0 <= i < table_size for i in ids):
        raise ConfigError(
            f"diffusion.model.class_ids must list {num_classes} ids in [0, {table_size}); got {list(ids)}."
        )
    return torch.tensor(list(ids), dtype=torch.long)


def pixel_denoiser(net: UNet2DModel, model_cfg: Mapping, num_classes: int) -> Denoiser:
    table = net.config.num_class_embeds - 1  # the last embedding is the null class
    c, s = net.config.in_channels, net.config.sample_size
    return Denoiser(net, (c, s, s), class_id_map(model_cfg, num_classes, table), table, drops_labels=False)


def latent_denoiser(net: DiTTransformer2DModel, model_cfg: Mapping, num_classes: int) -> Denoiser:
    table = net.config.num_embeds_ada_norm  # DiT's null class is the id after its last class
    c, s = net.config.in_channels, net.config.sample_size
    return Denoiser(net, (c, s, s), class_id_map(model_cfg, num_classes, table), table, drops_labels=True)


Codec = PixelCodec | VaeCodec


def fresh_unet(dcfg: Mapping, num_classes: int, channels: int, resolution: int, codec: Codec) -> UNet2DModel:
    return build_unet(dcfg["model"], num_classes, channels, resolution)


def fresh_dit(dcfg: Mapping, num_classes: int, channels: int, resolution: int, codec: Codec) -> DiTTransformer2DModel:
    vae = cast(VaeCodec, codec).decoder  # a latent backbone always has a VAE codec
    size = dcfg["model"]["image_size"] // vae_factor(vae)
    return build_dit(dcfg["model"], num_classes, vae.config.latent_channels, size)


def vae_codec(dcfg: Mapping, channels: int, need_encoder: bool) -> VaeCodec:
    """The VAE pair of a latent model; the encoder is loaded only when real images must be encoded."""
    model_cfg = dcfg["model"]
    decoder = load_vae(model_cfg, "vae_decode", channels)
    # random weights: both come from vae_config
    same = model_cfg["vae"] == model_cfg["vae_decode"] or model_cfg["random_weights"]
    encoder = (decoder if same else load_vae(model_cfg, "vae", channels)) if need_encoder else None
    return VaeCodec(encoder, decoder)


@dataclass(frozen=True)
class Backbone:
    """What differs between the backbones; every step below that depends on diffusion.backbone asks it."""

    net_cls: type  # what from_pretrained loads
    fresh: Callable[[Mapping, int, int, int, Codec], torch.nn.Module]  # (dcfg, classes, channels, res, codec)
    denoiser: Callable[[Any, Mapping, int], Denoiser]  # (net, diffusion.model, classes)
    codec: Callable[[Mapping, int, bool], Codec]  # (dcfg, channels, need_encoder)
    image_size: Callable[[Mapping, int], int]  # (dcfg, dataset resolution) -> the side the model sees


# diffusion.backbone -> its builders
BACKBONES = {
    "pixel": Backbone(
        UNet2DModel, fresh_unet, pixel_denoiser, lambda dcfg, channels, need_encoder: PixelCodec(), lambda dcfg, r: r
    ),
    "latent": Backbone(
        DiTTransformer2DModel,
        fresh_dit,
        latent_denoiser,
        vae_codec,
        lambda dcfg, r: int(dcfg["model"]["image_size"]),
    ),
}


def backbone(dcfg: Mapping) -> Backbone:
    name = dcfg["backbone"]
    if name not in BACKBONES:
        raise ConfigError(f"Unknown diffusion.backbone {name!r}; set it to one of {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def fresh_denoiser(dcfg: Mapping, num_classes: int, channels: int, resolution: int, codec: Codec) -> Denoiser:
    """An untrained denoiser of the configured backbone (trained from scratch by the stage)."""
    b = backbone(dcfg)
    return b.denoiser(b.fresh(dcfg, num_classes, channels, resolution, codec), dcfg["model"], num_classes)


def pretrained_denoiser(dcfg: Mapping, num_classes: int, channels: int, resolution: int, codec: Codec) -> Denoiser:
    """The denoiser `diffusion.model.pretrained` names, or its architecture with random weights when
    diffusion.model.random_weights is set (dry runs and timings without the download)."""
    model_cfg = dcfg["model"]
    if model_cfg["random_weights"]:
        return fresh_denoiser(dcfg, num_classes, channels, resolution, codec)
    return saved_denoiser(
        dcfg, model_cfg["pretrained"], num_classes, "diffusion.model.pretrained", subfolder=model_cfg["subfolder"]
    )


def saved_denoiser(dcfg: Mapping, path: str, num_classes: int, option: str, subfolder: str | None = None) -> Denoiser:
    """A denoiser saved with save_pretrained (a hub id or directory)."""
    b = backbone(dcfg)
    return b.denoiser(from_pretrained(b.net_cls, path, option, subfolder=subfolder), dcfg["model"], num_classes)


def make_codec(dcfg: Mapping, channels: int, need_encoder: bool) -> Codec:
    """The image <-> model-space map; the VAE encoder is loaded only when real images must be encoded."""
    return backbone(dcfg).codec(dcfg, channels, need_encoder)


def model_image_size(dcfg: Mapping, resolution: int) -> int:
    """The side the model sees: the dataset's for pixel models, diffusion.model.image_size for latent ones."""
    return backbone(dcfg).image_size(dcfg, resolution)


def to_signed(x: torch.Tensor, spec) -> torch.Tensor:
    """Dataset-normalised images -> [-1, 1], the range diffusion models and VAEs work in."""
    return spec.denormalize(x) * 2 - 1
