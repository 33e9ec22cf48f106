"""Training and fine-tuning a class-conditional denoiser: one loop, any fine-tuning objective.

    z0   = encode(real batch)                      (pixels in [-1, 1], or VAE latents)
    t    ~ U{0, T-1},  eps ~ N(0, I),  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    y    = model class ids, each replaced by the null id with probability label_dropout (one draw per sample)
    loss = objective(eps_theta(z_t, t, y), eps, x0_hat, z0, y)

The same loop trains a pixel model from scratch (`plain`) and fine-tunes any
model with a fine-tuning method (ddist/methods/: `plain`, `minimax`, `rsm`, ...), optionally on DiffFit's parameter
subset only (MiniMax's on the DiT: DitDiffFit), optionally keeping an EMA of the
weights that is saved and sampled instead (WeightAverage).

It runs on the engine (ddist/training/engine.py): the step above is its step function; the
update clips gradients (clip_grad_norm, null = off) and steps the lr schedule (constant | cosine,
after warmup_steps of linear warm-up); callbacks step the EMA, log every `log_every` steps and
checkpoint.

Resume: given a work directory, every `checkpoint_every` steps the loop saves the
model, optimiser, data order (with the generator the noise is drawn from), MiniMax's
memories, the global RNG states and the step (the engine's partial checkpoint); a
rerun loads it and goes on, ending byte-identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

from ddist.config.schema import DiffusionTrainConfig, FinetuneConfig
from ddist.data.augment import resize
from ddist.errors import ConfigError
from ddist.logging import info
from ddist.methods import finetune_method
from ddist.models.diffusion import Denoiser, DitDiffFit, WeightAverage, to_signed
from ddist.objectives.diffusion import predict_x0
from ddist.training.engine import EMA, Checkpoint, Log, Loop, Optim, run_loop
from ddist.training.loop import real_batches, seed_everything
from ddist.utils import ceil_div


def is_difffit(name: str) -> bool:
    """DiffFit's subset (Xie et al. 2023) on the pixel UNet: biases, normalisation and embedding parameters.

    MiniMax's rule (DitDiffFit) is written for DiT; on the UNet this keeps its earlier meaning:
    biases, the GroupNorm scales (MiniMax's `norm`), the class table (its `y_embed`) and also
    the time-embedding MLP's weights (modules named *emb*).
    """
    parts = name.split(".")
    return parts[-1] == "bias" or any("norm" in p or "emb" in p for p in parts[:-1])


def select_parameters(net: torch.nn.Module, subset: str) -> tuple[list[torch.nn.Parameter], Callable[[], None]]:
    """Turn gradients on for `all` parameters or the `difffit` subset (off for the rest). Returns
    them and what to call when training ends (the DiT's DiffFit folds its scales into the network)."""
    if subset == "difffit" and isinstance(net, DiTTransformer2DModel):
        difffit = DitDiffFit(net)
        rule, finish = difffit.trainable, difffit.finish
    else:
        rule, finish = (is_difffit if subset == "difffit" else _every), _nothing
    chosen = []
    for name, p in net.named_parameters():
        p.requires_grad_(rule(name))
        if p.requires_grad:
            chosen.append(p)
    return chosen, finish


def _every(name: str) -> bool:
    return True


def _nothing() -> None:
    pass


def drop_labels(ids: torch.Tensor, p: float, null_id: int, generator: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance's label dropout: each sample's class id becomes the null id with
    probability p, one draw per sample (DiT, MiniMax), from the loop's generator (so a resumed run draws the same)."""
    drop = (torch.rand(len(ids), generator=generator) < p).to(ids.device)
    return torch.where(drop, null_id, ids)


def total_steps(tcfg: DiffusionTrainConfig, num_images: int) -> int:
    """`steps` when set, else `epochs` passes over the train split (finetune's option: train sets steps)."""
    if tcfg.steps:
        return int(tcfg.steps)
    return int(cast(FinetuneConfig, tcfg).epochs) * ceil_div(num_images, tcfg.batch_size)


class EndlessBatches:
    """Shuffled real batches in [-1, 1], epoch after epoch, that a checkpoint can restore.

    Its state: the generator's state when the current epoch drew its order, how many of the
    epoch's batches were drawn, and the generator's state now (the loop draws noise from it
    too). Restoring redraws the epoch's order, skips the batches drawn, then resets the
    generator: the batches and noise that follow are those of an uninterrupted run.
    """

    def __init__(self, ds, spec, batch_size: int, generator: torch.Generator):
        self.ds, self.spec, self.batch_size, self.generator = ds, spec, batch_size, generator
        self.epoch: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        self.epoch_start, self.drawn = generator.get_state(), 0

    def __iter__(self) -> EndlessBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.epoch, None)
        if batch is None:  # the epoch is over: the next one shuffles (on its first batch)
            self.epoch_start, self.drawn = self.generator.get_state(), 0
            self.epoch = real_batches(self.ds, self.spec, self.batch_size, shuffle=True, generator=self.generator)
            batch = next(self.epoch)
        self.drawn += 1
        x, y = batch
        return to_signed(x, self.spec), y

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_start": self.epoch_start, "drawn": self.drawn, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["epoch_start"])
        self.epoch = real_batches(self.ds, self.spec, self.batch_size, shuffle=True, generator=self.generator)
        for _ in range(state["drawn"]):
            next(self.epoch)
        self.epoch_start, self.drawn = state["epoch_start"], state["drawn"]
        self.generator.set_state(state["generator"])


@dataclass
class TrainData:
    """The real images a denoiser trains on: the split `ds` (with its `spec`), resized to `image_size`."""

    ds: Any
    spec: Any
    image_size: int


@dataclass
class Phase:
    """One training phase: `name` train (from scratch, every parameter) | finetune, its fine-tuning
    `objective` (a method of ddist/methods/) and its settings `tcfg` (conf/diffusion: train | finetune,
    whose schema FinetuneConfig extends train's with the fine-tuning options)."""

    name: str
    objective: str
    tcfg: DiffusionTrainConfig


def train_denoiser(
    denoiser: Denoiser,
    codec,
    scheduler: DDPMScheduler,
    data: TrainData,
    phase: Phase,
    device: torch.device,
    logger,
    work_dir: Path | None = None,
) -> list[float]:
    """Run the loop for total_steps(tcfg) steps; returns the loss of every step run by this call.

    tcfg (phase.tcfg, typed by the schema): steps | epochs, batch_size, lr, weight_decay, params, label_dropout,
    seed, ema, ema_schedule, clip_grad_norm, schedule, warmup_steps, log_every (the last four default to off,
    constant, 0, 100), the objective's settings (rsm.lambda, rsm.reduction, minimax.*) and, with a
    `work_dir` to checkpoint into and resume from, checkpoint_every.
    """
    tcfg, name = phase.tcfg, phase.name
    seed_everything(int(tcfg.seed))  # the VAE draws its posterior samples from the global generator
    net = denoiser.net.to(device).train()
    subset = str(cast(FinetuneConfig, tcfg).params) if name == "finetune" else "all"  # from scratch: all
    params, finish = select_parameters(net, subset)
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    ema = WeightAverage(net, params, tcfg.ema, str(tcfg.ema_schedule), f"diffusion.{name}")
    # objective(eps_pred, eps, x0_hat, z0, y) -> (loss, parts to log), from its method (ddist/methods/)
    loss_fn = finetune_method(phase.objective).build(tcfg, num_classes=len(denoiser.class_ids))
    gen = torch.Generator().manual_seed(int(tcfg.seed))
    abar = scheduler.alphas_cumprod.to(device)
    steps = total_steps(tcfg, len(data.ds))
    schedule = denoiser_schedule(optimizer, tcfg, steps)
    batches = EndlessBatches(data.ds, data.spec, tcfg.batch_size, gen)
    info(
        f"diffusion: {name} ({phase.objective}) for {steps} steps, "
        f"{sum(p.numel() for p in params)} trainable parameters"
    )
    state = {"model": net, "optimizer": optimizer, "batches": batches, "ema": ema}
    if schedule is not None:  # constant: none, so the checkpoint holds what it held before schedules
        state["schedule"] = schedule
    if hasattr(loss_fn, "state_dict"):  # an objective with state (MiniMax's memories) is checkpointed too
        state["objective"] = loss_fn
    every = tcfg.checkpoint_every if work_dir is not None else 1
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"diffusion.{name}.checkpoint_every must be a positive number of steps (got {every!r}).")
    checkpoint = Checkpoint(work_dir, every, steps, state)
    start = checkpoint.resume(f"diffusion {name}")

    def step_fn(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        with torch.no_grad():
            z0 = codec.encode(resize(x, data.image_size).to(device), sample=True)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(y),), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z_t = scheduler.add_noise(z0, eps, t)
        ids = drop_labels(denoiser.model_ids(y).to(device), tcfg.label_dropout, denoiser.null_id, gen)
        eps_pred = denoiser.eps(z_t, t, ids)
        x0_hat = predict_x0(z_t, eps_pred, abar[t])
        return loss_fn(eps_pred, eps, x0_hat, z0, y.to(device))

    losses: list[float] = []

    def record(done: int, loss: torch.Tensor, parts: Mapping) -> None:
        losses.append(loss.item())

    def write(done: int, loss: torch.Tensor, parts: Mapping) -> None:
        logger.log(
            {
                f"diffusion/{name}_loss": loss.item(),
                f"diffusion/{name}_lr": optim.lr(),
                **{f"diffusion/{name}_{k}": v.item() for k, v in parts.items()},
            }
        )

    optim = Optim(optimizer, params, schedule, tcfg.clip_grad_norm)
    callbacks = [EMA(ema), Log(1, steps, record), Log(tcfg.log_every, steps, write), checkpoint]
    loop = Loop(steps, desc=f"diffusion {name}", stage=f"diffusion {name}", hint=f"Lower diffusion.{name}.lr.")
    run_loop(step_fn, batches, optim, callbacks, dataclasses.replace(loop, start=start))
    ema.copy_to_net()  # the average is what gets saved and sampled from
    finish()
    net.requires_grad_(False).eval()
    return losses


def denoiser_schedule(
    optimizer: torch.optim.Optimizer, tcfg: DiffusionTrainConfig, steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step lr schedule (tcfg.schedule): None for constant without warm-up, else a linear
    warm-up over tcfg.warmup_steps then constant | cosine to zero over the remaining steps."""
    kind, warmup = tcfg.schedule, int(tcfg.warmup_steps or 0)
    if kind == "constant" and warmup == 0:
        return None
    if kind not in ("constant", "cosine"):
        raise ConfigError(f"diffusion schedule must be constant or cosine (got {kind!r}).")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
