"""Classifier training: the one loop (`fit`) for the teacher (squeeze) and every student
(evaluate), and the small pieces training shares: seeding, devices, optimisers, per-step
lr schedules, epochs by IPC, real batches, accuracy.

fit:
    for each batch of the stream:       (a replayable, seeded stream: data order, augmentation, mix)
        loss = loss_fn(model, batch)
        step the optimiser and the per-step lr schedule (gradients clipped when asked)
        every log_every steps: log loss and lr against the stage's step
        every epoch: checkpoint (model, optimiser, schedule, step) into the work directory

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
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from ddist.data import ImageDataset, torch_dataset
from ddist.errors import ConfigError, DivergenceError
from ddist.logging import RunLogger, info, progress
from ddist.runtime import distributed
from ddist.runtime.artifacts import atomic_path

CHECKPOINT = "partial.pt"


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


def make_optimizer(params, opt: Mapping) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW from a config node with optimizer, lr, momentum, weight_decay."""
    if opt["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    return torch.optim.AdamW(params, lr=opt["lr"], weight_decay=opt["weight_decay"])


def make_schedule(optimizer: torch.optim.Optimizer, opt: Mapping, total_steps: int):
    """Per-step schedule (opt.schedule): cosine to zero, step decay at fractions of training
    (multistep: opt.milestones, opt.gamma), or constant."""
    if opt["schedule"] == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    if opt["schedule"] == "multistep":
        milestones = [int(f * total_steps) for f in opt["milestones"]]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=opt["gamma"])
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


def check_finite(loss: torch.Tensor, stage: str, step: int, hint: str) -> None:
    if not torch.isfinite(loss):
        raise DivergenceError(
            f"The {stage} loss became {loss.item()} at iteration {step}. {hint} "
            "Earlier artifacts are left as they were."
        )


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


def autocast(precision: str, device_type: str):
    """Mixed precision for the forward pass: torch.autocast at bf16/fp16, nothing at fp32."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def fit(
    model: torch.nn.Module,
    stream: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    *,
    total_steps: int,
    steps_per_epoch: int,
    stage: str,
    hint: str,
    logger: RunLogger,
    log_every: int,
    desc: str,
    clip_grad_norm: float | None = None,
    work_dir: Path | None = None,
    log_key: str | None = None,
    precision: str = "fp32",
    compile: bool = False,
) -> None:
    """Train `model` on `stream` (total_steps batches). `hint` says what to change when the loss
    is NaN; `log_key` prefixes the logged names (default: the stage); `work_dir` enables resume.
    `precision` bf16/fp16 runs the forward pass under autocast (fp16 with a GradScaler);
    `compile` runs it through torch.compile (checkpoints keep the plain model's names)."""
    key = log_key or stage
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    parts = {"model": model, "optimizer": optimizer, "schedule": schedule, "scaler": scaler}
    start = resume(work_dir, parts)
    if start:
        info(f"{desc}: resuming at step {start}/{total_steps} (epoch {start // steps_per_epoch + 1})")
    # torch.compile of a Module returns a Module (OptimizedModule); its stubs only promise a callable
    forward = distributed.wrap(model)  # DDP under torchrun: gradients averaged over the ranks
    forward = cast(torch.nn.Module, torch.compile(forward)) if compile else forward
    model.train()
    for step, batch in enumerate(progress(stream, desc=desc, total=total_steps)):
        if step < start:
            continue  # replayed, already trained on
        with autocast(precision, device_type):
            loss = loss_fn(forward, batch)
        check_finite(loss, stage, step, hint)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            logger.log({f"{key}/loss": loss.item(), f"{key}/lr": schedule.get_last_lr()[0]}, step=done)
        if work_dir is not None and done % steps_per_epoch == 0 and done < total_steps and distributed.is_main():
            save_partial(work_dir, done, parts)
    if work_dir is not None and distributed.is_main():
        (work_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: the caller keeps the result


def save_partial(work_dir: Path, step: int, parts: Mapping[str, Any]) -> None:
    """Checkpoint the state of `parts` (anything with state_dict: model, optimiser, schedule, a
    resumable data stream), the step and the global RNG states into the work directory, atomically."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(step=step, torch_rng=torch.get_rng_state(), cuda_rng=_cuda_rng_states())
    with atomic_path(work_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def resume(work_dir: Path | None, parts: Mapping[str, Any]) -> int:
    """Load the work directory's checkpoint into `parts` and the global RNGs; its step (0: none)."""
    path = None if work_dir is None else work_dir / CHECKPOINT
    if path is None or not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, part in parts.items():
            if state[name]:  # a disabled GradScaler's state is {}, which it refuses to load
                part.load_state_dict(state[name])
    except Exception as err:
        info(f"ignoring the unreadable checkpoint {path} ({type(err).__name__}); starting over")
        return 0
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state.get("cuda_rng", [])  # older checkpoints have none
    if cuda_rng and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    return int(state["step"])


def _cuda_rng_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
