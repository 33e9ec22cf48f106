"""Batched image augmentation with explicit, replayable parameters.

Every augmentation is split into `sample_*` (draw parameters from a torch.Generator) and
`apply*` (a pure function of images and parameters). Replaying stored parameters
therefore reproduces a batch exactly, which the stored relabel mode relies on, and the
same code serves recover (differentiable, on the synthetic pixels) and student training.

- crop + flip: RandomResizedCrop(scale, ratio 3/4..4/3) and horizontal flip, done as one affine
  `grid_sample` so it is vectorised and differentiable; one box and one flip per image
  (`crop_draw: per_image`) or one of each for the whole batch (`crop_draw: per_batch`, what SRe2L's
  recover gets by calling torchvision's RandomResizedCrop and RandomHorizontalFlip on the batch tensor).
- roll: one random circular shift of the whole batch (SRe2L's jitter), each offset drawn from
  [0, roll] (`roll_mode: sre2l`, `random.randint(0, lim)` as SRe2L's CIFAR and ImageNet recover;
  Python's randint includes lim) or [-roll, roll] (`roll_mode: symmetric`, `randint(-lim, lim)` as
  SRe2L's Tiny-ImageNet recover and DeepInversion).
- CutMix (Yun et al. 2019) and Mixup (Zhang et al. 2018): one lambda and one partner
  permutation per batch.

`resize` (deterministic, not an augmentation) lives here too, the one resize of image batches:
the uint8 datasets and the diffusion models' input size both use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- crop, flip, roll


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square images to `size` x `size` (antialiased when shrinking); a no-op at that size already."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def sample_params(n: int, aug: Mapping, resolution: int, generator: torch.Generator) -> Params:
    """Parameters of one batch of n images: crop boxes [n, 4] and flips [n], drawn per image or once for
    the batch (crop_draw), and one roll for the batch. `aug` holds crop_scale, flip, crop_draw, roll and
    roll_mode (dataset.augment.*)."""
    params: Params = {}
    draws = 1 if aug["crop_draw"] == "per_batch" else n
    if aug["crop_scale"]:
        lo, hi = aug["crop_scale"]
        area = torch.empty(draws).uniform_(lo, hi, generator=generator)
        log_ratio = torch.empty(draws).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
        ratio = log_ratio.exp()
        width = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image side
        height = (area / ratio).sqrt().clamp(max=1.0)
        # box centre anywhere that keeps the box inside the image, in [-1, 1] coordinates
        cx = (torch.rand(draws, generator=generator) * 2 - 1) * (1 - width)
        cy = (torch.rand(draws, generator=generator) * 2 - 1) * (1 - height)
        params["crop"] = torch.stack([cx, cy, width, height], dim=1)
    if aug["flip"]:
        params["flip"] = torch.rand(draws, generator=generator) < 0.5
    if draws != n:  # per batch: the one box and flip repeated for every image, [n, 4] and [n] as per image
        params.update({k: params[k].expand(n, *params[k].shape[1:]).clone() for k in ("crop", "flip") if k in params})
    if aug["roll"]:
        params["roll"] = sample_roll(int(aug["roll"]), aug["roll_mode"], generator)
    return params


def sample_roll(lim: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """The (dy, dx) offsets of one roll: each in [0, lim] (sre2l, as SRe2L's CIFAR and ImageNet recover)
    or [-lim, lim] (symmetric, as SRe2L's Tiny-ImageNet recover and DeepInversion)."""
    low = 0 if mode == "sre2l" else -lim
    return torch.randint(low, lim + 1, (2,), generator=generator)


def apply(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Apply crop/flip (one affine resample) and roll to a batch [N, C, H, W]."""
    if "crop" in params or "flip" in params:
        n = x.shape[0]
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        crop = params.get("crop")
        if crop is None:
            crop = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4)
        crop = crop.to(x.device, x.dtype)
        sign = torch.ones(n, device=x.device, dtype=x.dtype)
        if "flip" in params:
            sign = 1 - 2 * params["flip"].to(x.device, x.dtype)
        theta[:, 0, 0] = crop[:, 2] * sign
        theta[:, 0, 2] = crop[:, 0]
        theta[:, 1, 1] = crop[:, 3]
        theta[:, 1, 2] = crop[:, 1]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if "roll" in params:
        dy, dx = (int(v) for v in params["roll"])
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x


def apply_groups(x: torch.Tensor, params: list[Params]) -> torch.Tensor:
    """apply() to G equal groups stacked in x [G * B, C, H, W], group g with params[g]: the crops and flips
    (per image, or with crop_draw per_batch one of each per group) as one resample of the whole stack,
    each group's roll (one per batch) on its slice."""
    per_image: Params = {k: torch.cat([p[k] for p in params]) for k in ("crop", "flip") if k in params[0]}
    x = apply(x, per_image)
    if "roll" not in params[0]:
        return x
    slices = x.chunk(len(params))
    return torch.cat([apply(s, {"roll": p["roll"]}) for s, p in zip(slices, params, strict=True)])


# ----------------------------------------------------------------------------- CutMix / Mixup


def sample_mix(n: int, kind: str, alpha: float, resolution: int, generator: torch.Generator) -> Params:
    """One lambda ~ Beta(alpha, alpha) and a partner permutation; CutMix also draws a box."""
    if kind == "none":
        return {}
    lam = _beta(alpha, generator)
    perm = torch.randperm(n, generator=generator)
    if kind == "mixup":
        return {"perm": perm, "lam": torch.tensor(lam)}
    side = math.sqrt(1.0 - lam)
    h = w = resolution
    ch, cw = int(h * side), int(w * side)
    cy = int(torch.randint(h, (1,), generator=generator))
    cx = int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the exact share of the image kept
    return {"perm": perm, "box": torch.tensor([y0, y1, x0, x1]), "lam": torch.tensor(lam)}


def apply_mix(x: torch.Tensor, mix: Params) -> torch.Tensor:
    if not mix:
        return x
    perm = mix["perm"].to(x.device)
    if "box" in mix:
        y0, y1, x0, x1 = (int(v) for v in mix["box"])
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        return x
    lam = float(mix["lam"])
    return lam * x + (1 - lam) * x[perm]


def mix_targets(targets: torch.Tensor, mix: Params) -> torch.Tensor:
    """Mix probability targets [N, K] with the same lambda and partners as the images."""
    if not mix:
        return targets
    lam = float(mix["lam"])
    return lam * targets + (1 - lam) * targets[mix["perm"].to(targets.device)]


def _beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) from two seeded Gamma draws (torch's Beta takes no generator)."""
    a = torch._standard_gamma(torch.tensor([alpha, alpha], dtype=torch.float64), generator=generator)
    return float(a[0] / a.sum())


# ----------------------------------------------------------------------------- the batch plan


def batch_plan(
    num_images: int, batch_size: int, epochs: int, aug: Mapping, mix: str, mix_alpha: float, resolution: int, seed: int
) -> Iterator[Params]:
    """Every training batch of `epochs` epochs: image indices, augmentation and mix parameters.

    Fully determined by `seed`, so the online and stored relabel modes see identical batches.
    """
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(num_images, generator=generator)
        for start in range(0, num_images, batch_size):
            idx = order[start : start + batch_size]
            batch = {"indices": idx, **sample_params(len(idx), aug, resolution, generator)}
            batch.update(
                {f"mix_{k}": v for k, v in sample_mix(len(idx), mix, mix_alpha, resolution, generator).items()}
            )
            yield batch


def split_mix(batch: Params) -> tuple[Params, Params]:
    """Separate a plan batch into (augmentation params, mix params)."""
    aug = {k: v for k, v in batch.items() if k in ("crop", "flip", "roll")}
    mix = {k[4:]: v for k, v in batch.items() if k.startswith("mix_")}
    return aug, mix
