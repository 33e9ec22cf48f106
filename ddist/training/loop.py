"""Classifier training: `fit`, the step function on the engine (ddist/training/engine.py) for the
teacher (squeeze) and every student (evaluate), and the small pieces training shares: seeding,
devices, optimisers, per-step lr schedules, epochs by IPC, real batches, accuracy.

fit:
    for each batch of the stream:       (a replayable, seeded stream: data order, augmentation, mix)
        loss = loss_fn(model, batch)
        step the optimiser and the per-step lr schedule (gradients clipped when asked)
        every log_every steps: log loss and lr against the stage's step
        at the end of an epoch, checkpoint_interval seconds after the last: checkpoint (model, optimiser,
        schedule, step) into the work directory

Under torchrun the model is DistributedDataParallel: every rank replays the same stream and
its loss_fn trains on its part of each batch (ddist.runtime.distributed.my_part), so the batch size,
the steps and the schedule are those of one process; rank 0 alone writes checkpoints.

Resume: a rerun with the same work directory loads the last checkpoint and replays the
stream up to its step without computing anything (the stream is a pure function of its
seed, so the skipped batches are exactly the ones already trained on), then goes on. The
result is byte-identical to an uninterrupted run on CPU. A checkpoint holds no trace of the
rank count: a run resumes with as many ranks as it likes (byte-identical only with the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ddist.config.schema import EvaluateConfig, RecoverConfig, TeacherConfig
from ddist.data import ImageDataset, torch_dataset
from ddist.errors import ConfigError
from ddist.logging import RunLogger
from ddist.runtime import distributed
from ddist.training.engine import CHECKPOINT, Checkpoint, Log, Loop, Optim, Throttle, check_finite, run_loop

__all__ = ["CHECKPOINT", "check_finite"]  # re-exported: where the checkpoint and divergence check used to live


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here. Set device=auto or device=cpu.")
    if name.startswith("cuda:") and distributed.active():
        raise ConfigError(f"device={name} under torchrun: each rank uses its own GPU (LOCAL_RANK). Set device=auto.")
    return torch.device(name)


def make_optimizer(params, opt: TeacherConfig | EvaluateConfig | DictConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW from teacher or evaluate: optimizer, lr, momentum, weight_decay."""
    if opt.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def make_schedule(
    optimizer: torch.optim.Optimizer, opt: TeacherConfig | EvaluateConfig | RecoverConfig | DictConfig, total_steps: int
):
    """Per-step schedule (opt.schedule): cosine to zero, step decay at fractions of training
    (multistep, evaluate's only: opt.milestones, opt.gamma), or constant."""
    if opt.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    if opt.schedule == "multistep":
        ev = cast(EvaluateConfig, opt)  # the one schema whose schedule admits multistep
        milestones = [int(f * total_steps) for f in ev.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=ev.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def epochs_for(epochs, ipc: int) -> int:
    """An epoch count, or a table {max_ipc: epochs, ..., max: epochs} picked by IPC (MiniMax's protocol)."""
    if isinstance(epochs, (int, float)):
        return int(epochs)
    table = {str(k): int(v) for k, v in dict(epochs).items()}
    for bound in sorted(int(k) for k in table if k != "max"):
        if ipc <= bound:
            return table[str(bound)]
    if "max" not in table:
        raise ConfigError(f"No epoch count for ipc={ipc} in {table}. Add a 'max' entry to the epochs table.")
    return table["max"]


def real_batches(
    ds: ImageDataset,
    spec,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised image batches of a real split: straight from the uint8 tensor when it is in memory."""
    images = ds.images
    if images is not None:
        n = len(ds.targets)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield spec.normalize(images[idx].float() / 255), ds.targets[idx]
    else:
        loader = DataLoader(
            torch_dataset(ds), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers
        )
        yield from loader


@torch.no_grad()
def accuracy(model: torch.nn.Module, ds: ImageDataset, spec, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (a fraction) of `model` on a real split."""
    model.eval()
    correct = total = 0
    for x, y in real_batches(ds, spec, batch_size, shuffle=False):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU with bf16 units (Ampere and
    later), or a CPU with AMX, whose oneDNN bf16 convolutions trained a ConvNet-3 student step 3-4x
    faster than fp32 at 32 px (README "Students in bf16"). Elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.cpu.get_capabilities().get("amx_bf16", False))
    return False


def student_precision(setting: str, run_precision: str, device: torch.device) -> str:
    """`evaluate.precision` resolved: fp32 | bf16 | fp16 as given; auto is bf16 where the device computes
    it natively (native_bf16) and the run's `precision` elsewhere."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else run_precision


def autocast(precision: str, device_type: str):
    """Mixed precision for the forward pass: torch.autocast at bf16/fp16, nothing at fp32."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


@dataclass
class Logging:
    """Where and how often a classifier loop logs: `logger` every `every` steps, its names prefixed
    by `key` (default: the loop's stage); `steps_per_epoch` also spaces the checkpoints, at the end of
    an epoch at least `checkpoint_interval` seconds after the last (0: every epoch)."""

    logger: RunLogger
    every: int
    steps_per_epoch: int
    key: str | None = None
    checkpoint_interval: float = 0.0
    # the model's accuracy on its test split, logged as `key`/test_acc every `test_every` epochs
    # (0: never) before the last step, which the caller measures and logs as the reported number
    test: Callable[[], float] | None = None
    test_every: int = 0


@dataclass
class Amp:
    """How the forward pass runs: `precision` fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler),
    `compile` through torch.compile (checkpoints keep the plain model's names)."""

    precision: str = "fp32"
    compile: bool = False


def fit(
    model: torch.nn.Module,
    stream: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    optim: Optim,
    loop: Loop,
    log: Logging,
    work_dir: Path | None = None,
    amp: Amp | None = None,
) -> None:
    """Train `model` on `stream` (loop.total batches, an epoch every `log.steps_per_epoch`) with
    `optim` (its params: the model's); `work_dir` enables the checkpoints (spaced by `log`) and the
    resume from the last."""
    amp = amp or Amp()
    device_type = next(model.parameters()).device.type
    optim.scaler = torch.amp.GradScaler(device_type, enabled=amp.precision == "fp16")
    parts = {"model": model, "optimizer": optim.optimizer, "schedule": optim.schedule, "scaler": optim.scaler}
    checkpoint = Checkpoint(work_dir, log.steps_per_epoch, loop.total, parts, Throttle(log.checkpoint_interval))
    start = checkpoint.resume(loop.desc)
    # torch.compile of a Module returns a Module (OptimizedModule); its stubs only promise a callable
    forward = distributed.wrap(model)  # DDP under torchrun: gradients averaged over the ranks
    forward = cast(torch.nn.Module, torch.compile(forward)) if amp.compile else forward
    model.train()

    def step_fn(step: int, batch: Any) -> tuple[torch.Tensor, dict]:
        with autocast(amp.precision, device_type):
            return loss_fn(forward, batch), {}

    key = log.key or loop.stage

    def write(done: int, loss: torch.Tensor, parts: Mapping) -> None:
        log.logger.log({f"{key}/loss": loss.item(), f"{key}/lr": optim.lr()}, step=done)

    replayed = itertools.islice(stream, start, None)  # the batches before `start`: already trained on
    callbacks = [Log(log.every, loop.total, write), checkpoint]
    if log.test is not None and log.test_every > 0:
        test = log.test

        def write_test(done: int, loss: torch.Tensor, parts: Mapping) -> None:
            if done < loop.total:
                log.logger.log({f"{key}/test_acc": test()}, step=done)
                model.train()  # accuracy() leaves it in eval mode

        callbacks.insert(1, Log(log.test_every * log.steps_per_epoch, loop.total, write_test))
    run_loop(step_fn, replayed, optim, callbacks, dataclasses.replace(loop, start=start))
