"""Training and fine-tuning a class-conditional denoiser: one loop, three objectives.

    z0   = encode(real batch)                      (pixels in [-1, 1], or VAE latents)
    t    ~ U{0, T-1},  eps ~ N(0, I),  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    y    = model class ids, replaced by the null id with probability label_dropout
    loss = objective(eps_theta(z_t, t, y), eps, x0_hat, z0, y)

The same loop trains a pixel model from scratch (`plain`) and fine-tunes any
model with `plain`, `minimax` or `rsm`, optionally on DiffFit's parameter
subset only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping

import torch
from diffusers import DDPMScheduler

from ddist.logging import info, progress
from ddist.objectives.minimax import ClassMemory, minimax_loss
from ddist.objectives.rsm import denoising_loss, predict_x0, rsm_loss
from ddist.stages.diffusion.backbones import Denoiser, resize, to_signed
from ddist.train import check_finite, real_batches, seed_everything

Objective = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def is_difffit(name: str) -> bool:
    """DiffFit's subset (Xie et al. 2023): biases, normalisation and embedding parameters.

    DiT's LayerNorms have no affine weights; its adaLN-Zero modulation layers
    (`norm1.linear`, ...) are the normalisation parameters, and `emb` covers
    the patch, timestep and class embeddings.
    """
    parts = name.split(".")
    return parts[-1] == "bias" or any("norm" in p or "emb" in p for p in parts[:-1])


def select_parameters(net: torch.nn.Module, subset: str) -> list[torch.nn.Parameter]:
    """Turn gradients on for `all` parameters or the `difffit` subset (off for the rest); return them."""
    chosen = []
    for name, p in net.named_parameters():
        p.requires_grad_(subset == "all" or is_difffit(name))
        if p.requires_grad:
            chosen.append(p)
    return chosen


def make_objective(name: str, fcfg: Mapping, num_classes: int) -> Objective:
    """objective(eps_pred, eps, x0_hat, z0, y) -> (loss, parts to log); MiniMax keeps its memories inside.
    `name` is plain, rsm or minimax (diffusion.finetune.objective, its schema admits no other)."""
    if name == "plain":
        return lambda eps_pred, eps, x0_hat, z0, y: (denoising_loss(eps_pred, eps), {})
    if name == "rsm":
        lam, reduction = fcfg["rsm"]["lambda"], fcfg["rsm"]["reduction"]
        return lambda eps_pred, eps, x0_hat, z0, y: rsm_loss(eps_pred, eps, x0_hat, lam, reduction)
    mcfg = fcfg["minimax"]
    real, gen = ClassMemory(num_classes, mcfg["memory"]), ClassMemory(num_classes, mcfg["memory"])

    def objective(eps_pred, eps, x0_hat, z0, y):
        out = minimax_loss(eps_pred, eps, x0_hat, y, real, gen, mcfg["lambda_pos"], mcfg["lambda_neg"])
        real.push(z0, y)
        gen.push(x0_hat, y)
        return out

    return objective


def total_steps(tcfg: Mapping, num_images: int) -> int:
    """`steps` when set, else `epochs` passes over the train split."""
    if tcfg["steps"]:
        return int(tcfg["steps"])
    return int(tcfg["epochs"]) * math.ceil(num_images / tcfg["batch_size"])


def endless_batches(
    ds, spec, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled real batches in [-1, 1], epoch after epoch."""
    for _ in itertools.count():
        for x, y in real_batches(ds, spec, batch_size, shuffle=True, generator=generator):
            yield to_signed(x, spec), y


def train_denoiser(
    denoiser: Denoiser,
    codec,
    ds,
    spec,
    scheduler: DDPMScheduler,
    tcfg: Mapping,
    objective: str,
    image_size: int,
    device: torch.device,
    logger,
    phase: str,
) -> list[float]:
    """Run the loop for total_steps(tcfg) steps; returns the loss of every step.

    tcfg: steps | epochs, batch_size, lr, weight_decay, params, label_dropout,
    seed and the objective's settings (rsm.lambda, rsm.reduction, minimax.*).
    """
    seed_everything(int(tcfg["seed"]))  # DiT draws its label dropout from the global generator
    net = denoiser.net.to(device).train()
    params = select_parameters(net, tcfg["params"] if phase == "finetune" else "all")  # from scratch: every weight
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    loss_fn = make_objective(objective, tcfg, len(denoiser.class_ids))
    gen = torch.Generator().manual_seed(int(tcfg["seed"]))
    abar = scheduler.alphas_cumprod.to(device)
    steps = total_steps(tcfg, len(ds))
    batches = endless_batches(ds, spec, tcfg["batch_size"], gen)
    info(f"diffusion: {phase} ({objective}) for {steps} steps, {sum(p.numel() for p in params)} trainable parameters")
    losses = []
    for step in progress(range(steps), desc=f"diffusion {phase}"):
        x, y = next(batches)
        with torch.no_grad():
            z0 = codec.encode(resize(x, image_size).to(device), sample=True)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(y),), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z_t = scheduler.add_noise(z0, eps, t)
        ids = denoiser.model_ids(y).to(device)
        if not denoiser.drops_labels:  # classifier-free guidance needs the null class in training
            drop = (torch.rand(len(y), generator=gen) < tcfg["label_dropout"]).to(device)
            ids = torch.where(drop, denoiser.null_id, ids)
        eps_pred = denoiser.eps(z_t, t, ids)
        x0_hat = predict_x0(z_t, eps_pred, abar[t])
        loss, parts = loss_fn(eps_pred, eps, x0_hat, z0, y.to(device))
        check_finite(loss, f"diffusion {phase}", step, f"Lower diffusion.{phase}.lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            logger.log(
                {
                    f"diffusion/{phase}_loss": losses[-1],
                    **{f"diffusion/{phase}_{k}": v.item() for k, v in parts.items()},
                }
            )
    net.requires_grad_(False).eval()
    return losses
