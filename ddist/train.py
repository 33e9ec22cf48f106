"""The one classifier-training loop: the teacher (squeeze) and every student (evaluate).

    for each batch of the stream:       (a replayable, seeded stream: data order, augmentation, mix)
        loss = loss_fn(model, batch)
        step the optimiser and the per-step lr schedule (gradients clipped when asked)
        every log_every steps: log loss and lr against the stage's step
        every epoch: checkpoint (model, optimiser, schedule, step) into the work directory

Resume: a rerun with the same work directory loads the last checkpoint and replays the
stream up to its step without computing anything (the stream is a pure function of its
seed, so the skipped batches are exactly the ones already trained on), then goes on. The
result is byte-identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ddist.artifacts import atomic_path
from ddist.logging import RunLogger, info, progress
from ddist.stages.training import check_finite

CHECKPOINT = "partial.pt"


def fit(model: torch.nn.Module, stream: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler, *, total_steps: int,
        steps_per_epoch: int, stage: str, hint: str, logger: RunLogger, log_every: int, desc: str,
        clip_grad_norm: float | None = None, work_dir: Path | None = None, log_key: str | None = None) -> None:
    """Train `model` on `stream` (total_steps batches). `hint` says what to change when the loss
    is NaN; `log_key` prefixes the logged names (default: the stage); `work_dir` enables resume."""
    key = log_key or stage
    start = resume(work_dir, model, optimizer, schedule)
    if start:
        info(f"{desc}: resuming at step {start}/{total_steps} (epoch {start // steps_per_epoch + 1})")
    model.train()
    for step, batch in enumerate(progress(stream, desc=desc, total=total_steps)):
        if step < start:
            continue  # replayed, already trained on
        loss = loss_fn(model, batch)
        check_finite(loss, stage, step, hint)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        schedule.step()
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            logger.log({f"{key}/loss": loss.item(), f"{key}/lr": schedule.get_last_lr()[0]}, step=done)
        if work_dir is not None and done % steps_per_epoch == 0 and done < total_steps:
            save_partial(work_dir, model, optimizer, schedule, done)
    if work_dir is not None:
        (work_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: the caller keeps the result


def save_partial(work_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "step": step, "torch_rng": torch.get_rng_state()}
    with atomic_path(work_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def resume(work_dir: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           schedule: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load the work directory's checkpoint into model, optimiser and schedule; its step (0: none)."""
    path = None if work_dir is None else work_dir / CHECKPOINT
    if path is None or not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint only costs the work since the start
        info(f"ignoring the unreadable checkpoint {path} ({type(err).__name__}); starting over")
        return 0
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
