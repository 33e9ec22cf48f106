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

Config nodes arrive typed (diffusion's DiffusionConfig and its model's PixelModelConfig or
LatentModelConfig, ddist/config/schema.py), so mypy checks each read; diffusers gets its model
keyword arguments (unet, dit, vae_config) as plain values, which it stores as its config. Pretrained
weights come from `from_pretrained` (a hub id or a local
directory); without them a model is built from the config and trained from
scratch by the stage. Offline with no local copy the load fails with a
ConfigError naming the option to set. WeightAverage keeps the optional EMA of the
weights during training (diffusion.train.ema / diffusion.finetune.ema, with its
ema_schedule); DitDiffFit is MiniMax's DiffFit parameter subset on the DiT.

Label dropout for classifier-free guidance is the training loop's, once per sample,
for both backbones: latent_denoiser turns off the per-block dropout of diffusers' DiT.

Imported only by the diffusion stage (diffusers is a heavy import): ddist.models does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.training_utils import EMAModel
from torch import nn

from ddist.config.schema import DiffusionConfig, DiffusionModelConfig, LatentModelConfig, PixelModelConfig
from ddist.errors import ConfigError
from ddist.logging import info
from ddist.runtime.artifacts import to_plain


@dataclass
class Denoiser:
    """eps_theta(z_t, t, y) of one backbone, with its class-id mapping."""

    net: torch.nn.Module  # UNet2DModel | DiTTransformer2DModel
    latent_shape: tuple[int, int, int]
    class_ids: torch.Tensor  # [num_classes]: dataset label -> model class id
    null_id: int  # the model's unconditional class id (the training loop drops labels to it)

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


class FixedEMA:
    """DiT's and MiniMax's EMA (update_ema in their train scripts): the average starts at the
    weights training starts from and takes p_ema = decay * p_ema + (1 - decay) * p after every step."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.mul_(self.decay).add_(p, alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to_net(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)


class WeightAverage:
    """An exponential moving average of a network's weights, updated after every optimiser step;
    `copy_to_net` puts the average into the network at the end, so the weights saved and sampled
    from are the average. decay None: off (no-ops). Two schedules (diffusion.<phase>.ema_schedule):

    - fixed: FixedEMA, as DiT and MiniMax (decay 0.9999 from the pretrained weights). It averages
      the trained parameters `params` only: a frozen weight is its own average (MiniMax averages
      every parameter, which moves the frozen ones by rounding only).
    - warmup: diffusers' EMAModel over every parameter: the first update copies the weights, the
      n-th (n >= 2) uses the decay min(decay, n / (n + 9)), so a short run from random weights
      does not keep them. It cannot reproduce a fixed decay.
    """

    def __init__(
        self, net: torch.nn.Module, params: list[nn.Parameter], decay: float | None, schedule: str, option: str
    ):
        if decay is not None and not 0 < decay < 1:
            raise ConfigError(f"{option}.ema={decay} must be a decay in (0, 1) (e.g. 0.9999), or null for no EMA.")
        self.net = net
        self.ema: EMAModel | FixedEMA | None = None
        if decay is not None:  # the schema admits only the two schedules
            self.ema = FixedEMA(params, decay) if schedule == "fixed" else EMAModel(net.parameters(), decay=decay)

    def step(self) -> None:
        if isinstance(self.ema, EMAModel):
            self.ema.step(self.net.parameters())
        elif self.ema is not None:
            self.ema.step()

    def copy_to_net(self) -> None:
        if isinstance(self.ema, EMAModel):
            self.ema.copy_to(self.net.parameters())
        elif self.ema is not None:
            self.ema.copy_to_net()

    # a checkpoint keeps the average (and EMAModel's step), so a resumed run averages as an uninterrupted one
    def state_dict(self) -> dict:
        return {} if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state)


class DitDiffFit:
    """MiniMax's DiffFit subset on a diffusers DiT (diffusion.finetune.params=difffit, latent backbone).

    MiniMax (train_dit.py, mark_difffit_trainable) trains the parameters of its DiT (models.py)
    whose names contain bias, norm, gamma or y_embed: 1,739,552 of DiT-XL/2. On diffusers' names:

    - y_embed: DiT has one class table (y_embedder) and one timestep MLP (t_embedder), whose sum
      conditions every block and the final layer. diffusers gives every block's norm1 its own
      CombinedTimestepLabelEmbeddings (the final layer uses block 0's), which the converted
      checkpoints fill with copies of DiT's one. reading: the blocks' embedders are tied to
      block 0's while fine-tuning (one module: DiT's structure), so the one class table trained
      is the one every block uses, as in DiT; training block 0's alone would leave 27 of 28
      blocks on the pretrained table. A base whose blocks' embedders differ (a DiT trained from
      scratch here) gets block 0's everywhere, which is logged.
    - bias: every bias (patch embedding, the timestep MLP, attention, MLP, adaLN modulation, final
      layer), as in DiT.
    - norm: normalisation layers' affine parameters: DiT's LayerNorms have none. The adaLN
      modulation (norm1.linear, proj_out_1) and the embedders (norm1.emb) are modules named norm*
      in diffusers only (adaLN_modulation, t_embedder in DiT): their weights stay frozen.
    - gamma: DiffFit's scales, which diffusers' DiT lacks, added as MiniMax's models.py has them
      on its first 14 of 28 blocks (here the first half), initialised to 1 (the pretrained
      function): attn1.gamma1 [3D] scales q, k and v; attn1.gamma2 and gamma1 [D] scale the
      attention output (before the adaLN gate); gamma2 [D] scales the MLP output. Forward hooks
      on those Linear layers apply them.

    finish() folds the scales into those Linear layers' weights and biases (a per-channel scale of
    a Linear's output) and unties the embedders into copies of the trained one, so the network is
    a plain DiTTransformer2DModel again, as save_pretrained writes it.
    """

    def __init__(self, net: DiTTransformer2DModel):
        self.net = net
        blocks = net.transformer_blocks
        emb = blocks[0].norm1.emb
        if any(not _same_parameters(emb, b.norm1.emb) for b in blocks[1:]):
            info("diffusion: DiffFit ties the blocks' differing timestep and class embedders to block 0's")
        for b in blocks[1:]:
            b.norm1.emb = emb
        self.scaled = list(blocks[: len(blocks) // 2])
        w = blocks[0].attn1.to_q.weight
        for b in self.scaled:
            dim = b.attn1.to_out[0].out_features
            b.attn1.gamma1 = nn.Parameter(torch.ones(3 * dim, device=w.device, dtype=w.dtype))
            for module, name in ((b.attn1, "gamma2"), (b, "gamma1"), (b, "gamma2")):
                setattr(module, name, nn.Parameter(torch.ones(dim, device=w.device, dtype=w.dtype)))
        self.hooks = [
            layer.register_forward_hook(lambda m, args, out, scale=scale: out * scale())
            for b in self.scaled
            for layer, scale in _scales(b)
        ]
        self.norm_affine = {
            f"{name}.{p}"
            for name, m in net.named_modules()
            if isinstance(m, nn.LayerNorm | nn.GroupNorm)
            for p, _ in m.named_parameters(recurse=False)
        }

    def trainable(self, name: str) -> bool:
        """MiniMax's rule (bias, norm, gamma, y_embed) on a parameter name of the tied network."""
        last = name.rsplit(".", 1)[-1]
        return last == "bias" or last.startswith("gamma") or ".class_embedder." in name or name in self.norm_affine

    @torch.no_grad()
    def finish(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for b in self.scaled:
            for layer, scale in _scales(b):
                s = scale()
                layer.weight.mul_(s[:, None])
                if layer.bias is not None:
                    layer.bias.mul_(s)
            del b.attn1.gamma1, b.attn1.gamma2, b.gamma1, b.gamma2
        blocks = self.net.transformer_blocks
        for b in blocks[1:]:
            b.norm1.emb = copy.deepcopy(blocks[0].norm1.emb)


def _scales(block: Any) -> list[tuple[nn.Linear, Callable[[], torch.Tensor]]]:
    """The Linear layers of a DiT block that DiffFit scales, each with its (current) per-channel scale."""
    attn = block.attn1
    dim = attn.to_out[0].out_features
    ff_out = [m for m in block.ff.net if isinstance(m, nn.Linear)][-1]
    return [
        (attn.to_q, lambda: attn.gamma1[:dim]),
        (attn.to_k, lambda: attn.gamma1[dim : 2 * dim]),
        (attn.to_v, lambda: attn.gamma1[2 * dim :]),
        (attn.to_out[0], lambda: attn.gamma2 * block.gamma1),
        (ff_out, lambda: block.gamma2),
    ]


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


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


def build_unet(model_cfg: PixelModelConfig, num_classes: int, channels: int, resolution: int) -> UNet2DModel:
    """A fresh UNet2DModel from `diffusion.model.unet` (class table num_classes + 1: the last id is null)."""
    try:
        return UNet2DModel(
            sample_size=resolution,
            in_channels=channels,
            out_channels=channels,
            num_class_embeds=num_classes + 1,
            **to_plain(model_cfg.unet),
        )
    except (ValueError, TypeError) as err:  # diffusers validates the block lists in its constructor
        raise ConfigError(
            f"diffusion.model.unet does not describe a UNet2DModel: {err} "
            "Give block_out_channels, down_block_types and up_block_types the same length."
        ) from None


def build_vae(model_cfg: LatentModelConfig, channels: int) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL from `diffusion.model.vae_config` (tests only).

    Seeded on its own, so every stage and process builds the same random VAE.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=channels, out_channels=channels, **to_plain(model_cfg.vae_config))


def build_dit(
    model_cfg: LatentModelConfig, num_classes: int, latent_channels: int, latent_size: int
) -> DiTTransformer2DModel:
    """A fresh DiTTransformer2DModel from `diffusion.model.dit`, predicting eps and a variance like DiT.

    Its class table has `dit.num_embeds_ada_norm` entries (DiT-XL/2: ImageNet-1k's 1000) when
    given, else one per dataset class (plus DiT's null class either way).
    """
    args = dict(to_plain(model_cfg.dit))
    table = args.pop("num_embeds_ada_norm", None) or num_classes
    return DiTTransformer2DModel(
        in_channels=latent_channels,
        out_channels=2 * latent_channels,
        sample_size=latent_size,
        num_embeds_ada_norm=table,
        **args,
    )


def load_vae(model_cfg: LatentModelConfig, key: str, channels: int) -> AutoencoderKL:
    """The VAE named by diffusion.model.<key> (hub id or directory); a random one from vae_config when it
    is null or diffusion.model.random_weights is set."""
    path = getattr(model_cfg, key)
    random = path is None or model_cfg.random_weights
    vae = (
        build_vae(model_cfg, channels)
        if random
        else from_pretrained(AutoencoderKL, path, f"diffusion.model.{key}", subfolder=model_cfg.vae_subfolder)
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


def class_id_map(model_cfg: DiffusionModelConfig, num_classes: int, table_size: int) -> torch.Tensor:
    """Dataset label -> model class id: diffusion.model.class_ids, or the identity when the model has our classes."""
    ids = model_cfg.class_ids
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


def pixel_denoiser(net: UNet2DModel, model_cfg: DiffusionModelConfig, num_classes: int) -> Denoiser:
    table = net.config.num_class_embeds - 1  # the last embedding is the null class
    c, s = net.config.in_channels, net.config.sample_size
    return Denoiser(net, (c, s, s), class_id_map(model_cfg, num_classes, table), table)


def latent_denoiser(net: DiTTransformer2DModel, model_cfg: DiffusionModelConfig, num_classes: int) -> Denoiser:
    """The DiT as a Denoiser, without its own label dropout.

    In train mode each of diffusers' DiT blocks drops the label on its own draw (every block's
    LabelEmbedding, class_dropout_prob 0.1 fixed by CombinedTimestepLabelEmbeddings; block 0's
    twice, for the final layer too): nearly every sample got a partly dropped label. DiT and
    MiniMax drop it once per sample, which the training loop does (with the null id below).
    """
    for m in net.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0  # its table keeps the null row (sized at construction)
    table = net.config.num_embeds_ada_norm  # DiT's null class is the id after its last class
    c, s = net.config.in_channels, net.config.sample_size
    return Denoiser(net, (c, s, s), class_id_map(model_cfg, num_classes, table), table)


Codec = PixelCodec | VaeCodec


def fresh_unet(dcfg: DiffusionConfig, num_classes: int, channels: int, resolution: int, codec: Codec) -> UNet2DModel:
    return build_unet(cast(PixelModelConfig, dcfg.model), num_classes, channels, resolution)  # backbone pixel


def fresh_dit(
    dcfg: DiffusionConfig, num_classes: int, channels: int, resolution: int, codec: Codec
) -> DiTTransformer2DModel:
    vae = cast(VaeCodec, codec).decoder  # a latent backbone always has a VAE codec
    model_cfg = cast(LatentModelConfig, dcfg.model)  # and a latent model
    size = model_cfg.image_size // vae_factor(vae)
    return build_dit(model_cfg, num_classes, vae.config.latent_channels, size)


def vae_codec(dcfg: DiffusionConfig, channels: int, need_encoder: bool) -> VaeCodec:
    """The VAE pair of a latent model; the encoder is loaded only when real images must be encoded."""
    model_cfg = cast(LatentModelConfig, dcfg.model)  # backbone latent
    decoder = load_vae(model_cfg, "vae_decode", channels)
    # random weights: both come from vae_config
    same = model_cfg.vae == model_cfg.vae_decode or model_cfg.random_weights
    encoder = (decoder if same else load_vae(model_cfg, "vae", channels)) if need_encoder else None
    return VaeCodec(encoder, decoder)


@dataclass(frozen=True)
class Backbone:
    """What differs between the backbones; every step below that depends on diffusion.backbone asks it."""

    net_cls: type  # what from_pretrained loads
    fresh: Callable[[DiffusionConfig, int, int, int, Codec], torch.nn.Module]  # (dcfg, classes, channels, res, codec)
    denoiser: Callable[[Any, DiffusionModelConfig, int], Denoiser]  # (net, diffusion.model, classes)
    codec: Callable[[DiffusionConfig, int, bool], Codec]  # (dcfg, channels, need_encoder)
    image_size: Callable[[DiffusionConfig, int], int]  # (dcfg, dataset resolution) -> the side the model sees


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
        lambda dcfg, r: int(cast(LatentModelConfig, dcfg.model).image_size),
    ),
}


def backbone(dcfg: DiffusionConfig) -> Backbone:
    name = str(dcfg.backbone)
    if name not in BACKBONES:
        raise ConfigError(f"Unknown diffusion.backbone {name!r}; set it to one of {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def fresh_denoiser(dcfg: DiffusionConfig, num_classes: int, channels: int, resolution: int, codec: Codec) -> Denoiser:
    """An untrained denoiser of the configured backbone (trained from scratch by the stage)."""
    b = backbone(dcfg)
    return b.denoiser(b.fresh(dcfg, num_classes, channels, resolution, codec), dcfg.model, num_classes)


def pretrained_denoiser(
    dcfg: DiffusionConfig, num_classes: int, channels: int, resolution: int, codec: Codec
) -> Denoiser:
    """The denoiser `diffusion.model.pretrained` names, or its architecture with random weights when
    diffusion.model.random_weights is set (dry runs and timings without the download)."""
    model_cfg = dcfg.model
    if model_cfg.random_weights:
        return fresh_denoiser(dcfg, num_classes, channels, resolution, codec)
    assert model_cfg.pretrained is not None, "the stage asks for a pretrained denoiser only when one is named"
    return saved_denoiser(
        dcfg, model_cfg.pretrained, num_classes, "diffusion.model.pretrained", subfolder=model_cfg.subfolder
    )


def saved_denoiser(
    dcfg: DiffusionConfig, path: str, num_classes: int, option: str, subfolder: str | None = None
) -> Denoiser:
    """A denoiser saved with save_pretrained (a hub id or directory)."""
    b = backbone(dcfg)
    return b.denoiser(from_pretrained(b.net_cls, path, option, subfolder=subfolder), dcfg.model, num_classes)


def make_codec(dcfg: DiffusionConfig, channels: int, need_encoder: bool) -> Codec:
    """The image <-> model-space map; the VAE encoder is loaded only when real images must be encoded."""
    return backbone(dcfg).codec(dcfg, channels, need_encoder)


def model_image_size(dcfg: DiffusionConfig, resolution: int) -> int:
    """The side the model sees: the dataset's for pixel models, diffusion.model.image_size for latent ones."""
    return backbone(dcfg).image_size(dcfg, resolution)


def to_signed(x: torch.Tensor, spec) -> torch.Tensor:
    """Dataset-normalised images -> [-1, 1], the range diffusion models and VAEs work in."""
    return spec.denormalize(x) * 2 - 1
