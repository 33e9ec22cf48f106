"""Sampling the distilled latents: independent (batched) or CGS (a class at a time, jointly guided).

Every image has its own random generator, seeded from (seed, class, index in
class), that draws its initial noise and then its per-step noise. How images
are grouped into batches therefore never changes what they are (up to float
rounding in batched kernels), and CGS with eta_dpp = mu_dm = 0 reproduces
independent sampling. The groups (sample_groups) are the stage's independent
parts: each depends on nothing but its rows, so a killed sampling resumes at
the group it was in and shards split the groups (ddist/runtime/workdir.py).

    z_T ~ N(0, I)                                   per image
    for each step t:
        eps = eps_u + s (eps_c - eps_u)             classifier-free guidance, scale s
                                                    (on the first guidance_channels channels only)
        z, x0_hat = scheduler.step(eps, t, z)       DDPM or DDIM (diffusers); x0_hat = pred_original_sample
        z   = guide(i, z, x0_hat)                   a Guidance callable; cgs only, inside its window
                                                    (start <= i / steps < end):
        Z_c = Z_c - (size(eta_dpp grad L_dpp) + mu_dm grad L_dm)   per class c (ddist.objectives.cgs;
                                                    size: cgs.step_norm, none | noise_std | cap)

CGS packs whole classes into the model's batches, so it costs independent
sampling's forward passes plus the guidance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ddist.config.schema import CGSConfig, NoiseScheduleConfig, SampleConfig
from ddist.data.augment import resize
from ddist.errors import ConfigError
from ddist.logging import info, progress
from ddist.models import FeatureModel
from ddist.models.diffusion import Denoiser
from ddist.objectives.cgs import CgsTerms, StepSize, clean_estimate, guidance_step

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}

# guide(i, z, x0_hat): the latents after step i (and that step's clean estimate) -> corrected latents
Guidance = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
# features(x0_hat): clean model-space estimates [N, C, h, w] -> feature vectors [N, F], differentiable
Features = Callable[[torch.Tensor], torch.Tensor]


def make_scheduler(schedule: NoiseScheduleConfig, kind: str) -> DDPMScheduler | DDIMScheduler:
    """A diffusers scheduler over the model's training noise schedule (`diffusion.schedule`)."""
    return SCHEDULERS[kind](
        num_train_timesteps=schedule.num_train_timesteps,
        beta_schedule=str(schedule.beta_schedule),
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        clip_sample=False,
    )


def image_generators(seed: int, labels: list[int], rows: list[int] | None = None) -> list[torch.Generator]:
    """One CPU generator per image (of `rows`, default all), seeded from (seed, class, index within the class)."""
    seen: dict[int, int] = {}
    keys = []
    for c in labels:
        keys.append((c, seen.get(c, 0)))
        seen[c] = keys[-1][1] + 1
    gens = []
    for r in range(len(labels)) if rows is None else rows:
        state = np.random.SeedSequence([seed, *keys[r]]).generate_state(1, dtype=np.uint64)[0]
        gens.append(torch.Generator().manual_seed(int(state)))
    return gens


def guided_eps(
    denoiser: Denoiser,
    z: torch.Tensor,
    t: torch.Tensor,
    ids: torch.Tensor,
    scale: float,
    batch_size: int,
    channels: int | None = None,
) -> torch.Tensor:
    """eps_u + scale * (eps_c - eps_u) (Ho & Salimans 2022, eq. 6), in forward passes of at most batch_size inputs.

    channels: guide only the first `channels` channels and keep eps_c on the rest, as DiT's
    reference sampler does (3 of its 4 latent channels, `forward_with_cfg` in DiT's models.py);
    None: all channels (diffusers' DiTPipeline, standard CFG).
    """
    if scale == 1.0:
        inputs, input_ids = z, ids
    else:
        inputs, input_ids = torch.cat([z, z]), torch.cat([ids, torch.full_like(ids, denoiser.null_id)])
    out = torch.cat(
        [
            denoiser.eps(inputs[s : s + batch_size], t, input_ids[s : s + batch_size])
            for s in range(0, len(inputs), batch_size)
        ]
    )
    if scale == 1.0:
        return out
    cond, uncond = out.chunk(2)
    guided = uncond + scale * (cond - uncond)
    if channels is None:
        return guided
    return torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)


def abar_after(scheduler, i: int) -> float:
    """abar of the latents the i-th step produces (1 after the last step: clean samples)."""
    timesteps = scheduler.timesteps
    return 1.0 if i + 1 >= len(timesteps) else float(scheduler.alphas_cumprod[timesteps[i + 1]])


def in_window(i: int, cgs: CGSConfig, num_steps: int) -> bool:
    """Guidance acts after step i (0-based, of num_steps) when start <= i / num_steps < end.

    i / num_steps is the fraction of the trajectory run before step i: 0 at the first step,
    (num_steps - 1) / num_steps at the last, so [0, 1) is every step and [0.5, 1) the second half.
    """
    return cgs.start <= i / num_steps < cgs.end


@torch.no_grad()
def denoise(
    denoiser: Denoiser,
    scheduler,
    z: torch.Tensor,
    ids: torch.Tensor,
    gens: list[torch.Generator],
    scfg: SampleConfig,
    guide: Guidance | None = None,
    desc: str = "sample",
) -> torch.Tensor:
    """Run the reverse process on one group of latents; guide (if any) corrects them after every step.
    Progress (ddist.logging.progress) is reported step by step under `desc`."""
    step_kwargs = {"eta": scfg.ddim_eta} if isinstance(scheduler, DDIMScheduler) else {}
    timesteps = scheduler.timesteps
    for i, t in enumerate(progress(timesteps, desc=desc, total=len(timesteps), unit="step")):
        eps = guided_eps(denoiser, z, t.to(z.device), ids, scfg.guidance_scale, scfg.batch_size, scfg.guidance_channels)
        out = scheduler.step(eps, t, z, generator=gens, **step_kwargs)
        z = out.prev_sample if guide is None else guide(i, out.prev_sample, out.pred_original_sample)
    return z


def kernel_embedding(kernel: str, x0_hat: torch.Tensor, abar_t: float, features: Features | None):
    """The map z -> DPP kernel vectors of one class: None (z itself), its clean estimate, or features of it."""
    if kernel == "zt":
        return None
    if kernel == "x0_hat":
        return lambda z: clean_estimate(z, x0_hat, abar_t)
    assert features is not None, "kernel teacher needs features (check_sample_config refuses it without)"
    return lambda z: features(clean_estimate(z, x0_hat, abar_t))


def cgs_guidance(
    cgs: CGSConfig, scheduler, classes: list[tuple[torch.Tensor, torch.Tensor]], features: Features | None = None
) -> Guidance:
    """CGS as a Guidance: inside the window (in_window), each class's latents take one guidance_step.

    classes: (rows of the group, real mean latent) of each whole class in the group.
    features: the teacher kernel's feature map (kernel teacher only).
    """
    num_steps = len(scheduler.timesteps)

    def guide(i: int, z: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        if not in_window(i, cgs, num_steps):
            return z
        abar = abar_after(scheduler, i)
        z = z.clone()
        for rows, mean in classes:
            embed = kernel_embedding(cgs.kernel, x0_hat[rows], abar, features)
            terms = CgsTerms(cgs.eta_dpp, cgs.mu_dm, mean, abar, cgs.eps, embed)
            z[rows] = guidance_step(z[rows], terms, StepSize(str(cgs.step_norm), cgs.max_step))
        return z

    return guide


def check_sample_config(scfg: SampleConfig, latent_channels: int, features: Features | None) -> None:
    """ConfigErrors for sampling options that cannot run, before any model pass."""
    method, cgs, channels = scfg.method, scfg.cgs, scfg.guidance_channels
    if channels is not None and not (isinstance(channels, int) and 1 <= channels <= latent_channels):
        raise ConfigError(
            f"diffusion.sample.guidance_channels must be null (all) or an integer in "
            f"[1, {latent_channels}] (the model's channels); got {channels!r}."
        )
    if method != "cgs":
        return
    if cgs.kernel == "teacher" and features is None:
        raise ConfigError(
            "diffusion.sample.cgs.kernel=teacher needs the teacher: put squeeze before diffusion in "
            "pipeline.stages, or set diffusion.sample.cgs.kernel to zt or x0_hat."
        )


def class_groups(labels: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Indices of whole classes packed, in label order, into groups of at most batch_size images
    (or one class, when a class alone is larger)."""
    groups, current = [], torch.zeros(0, dtype=torch.long)
    for c in labels.unique().tolist():
        rows = torch.nonzero(labels == c).flatten()
        if len(current) and len(current) + len(rows) > batch_size:
            groups.append(current)
            current = torch.zeros(0, dtype=torch.long)
        current = torch.cat([current, rows])
    return [*groups, current]


def sample_groups(labels: torch.Tensor, scfg: SampleConfig) -> list[torch.Tensor]:
    """The rows of each group the sampler denoises together: the independent parts of the set.

    independent: batches of scfg.batch_size images (classes mixed); cgs: whole classes packed
    into groups of about batch_size images (a larger class is a group of its own).
    """
    if scfg.method == "independent":
        size = scfg.batch_size
        return [torch.arange(s, min(s + size, len(labels))) for s in range(0, len(labels), size)]
    return class_groups(labels, scfg.batch_size)


@dataclass(frozen=True)
class CgsReference:
    """What CGS guides each class towards: its real mean latent class_means[c] and, for the teacher
    kernel, the teacher's feature map (teacher_features)."""

    class_means: torch.Tensor
    features: Features | None = None


@dataclass(frozen=True)
class GroupRows:
    """One group of sample_groups: its rows of the dataset's labels, and the name its denoising
    steps' progress is reported under."""

    rows: torch.Tensor
    desc: str = "sample"


def sample_group(
    denoiser: Denoiser,
    scheduler,
    labels: torch.Tensor,
    group: GroupRows,
    seed: int,
    scfg: SampleConfig,
    device: torch.device,
    reference: CgsReference | None = None,
) -> torch.Tensor:
    """Clean latents [len(rows), C, h, w] of the rows `group.rows` of dataset labels [N]: one group of
    sample_groups, which depends on nothing but its rows (each image has its own generator).
    reference: CGS's (method cgs only)."""
    rows, desc = group.rows, group.desc
    features = reference.features if reference is not None else None
    check_sample_config(scfg, denoiser.latent_shape[0], features)
    gens = image_generators(seed, labels.tolist(), rows.tolist())
    z = randn_tensor((len(rows), *denoiser.latent_shape), generator=gens, device=device)
    group_labels = labels[rows]
    ids = denoiser.model_ids(group_labels).to(device)
    scheduler.set_timesteps(scfg.steps, device=device)
    guide = None
    if scfg.method != "independent":
        assert reference is not None, "cgs needs its reference (class_means)"
        class_means = reference.class_means
        guide = cgs_guidance(
            scfg.cgs,
            scheduler,
            [
                (torch.nonzero(group_labels == c).flatten().to(device), class_means[c].to(device))
                for c in group_labels.unique().tolist()
            ],
            features,
        )
    return denoise(denoiser, scheduler, z, ids, gens, scfg, guide, desc=desc)


def sample_latents(
    denoiser: Denoiser,
    scheduler,
    labels: torch.Tensor,
    seed: int,
    scfg: SampleConfig,
    device: torch.device,
    reference: CgsReference | None = None,
    on_group=None,
) -> torch.Tensor:
    """Clean latents [N, C, h, w] for dataset labels [N], group by group (sample_groups, sample_group):
    each CGS class guided over all its images with its real mean latent reference.class_means[c] (and,
    for the teacher kernel, reference.features). on_group(done, total) is called after each group.
    """
    check_sample_config(scfg, denoiser.latent_shape[0], reference.features if reference is not None else None)
    groups = sample_groups(labels, scfg)
    out = torch.empty((len(labels), *denoiser.latent_shape), device=device)
    start = time.perf_counter()
    info(f"sampling {len(labels)} latents in {len(groups)} groups, {scfg.steps} steps each")
    for g, idx in enumerate(groups):
        group = GroupRows(idx, f"sample group {g + 1}/{len(groups)}")
        out[idx] = sample_group(denoiser, scheduler, labels, group, seed, scfg, device, reference)
        if on_group is not None:
            on_group(g + 1, len(groups))
    info(f"sampled {len(labels)} latents in {time.perf_counter() - start:.1f} s")
    return out


# ----------------------------------------------------------------------------- the teacher kernel and decoding


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
