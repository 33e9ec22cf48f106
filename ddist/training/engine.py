"""THE training engine: one loop with callbacks, in the spirit of minGPT's Trainer. The classifier
loop (`fit`: teacher and students), recover's pixel loop and the denoiser's loop are step functions on it.

run_loop(step_fn, batches, optim, callbacks, loop):
    for step in start .. total - 1:
        loss, parts = step_fn(step, next(batches))    the forward pass and the loss (parts: to log)
        loss not finite -> DivergenceError naming loop.stage and loop.hint
        optim.update(loss)          zero_grad, backward, clip (clip_grad_norm), step, lr schedule step
        for each callback, in order: on_step(step + 1, loss, parts)
    for each callback: on_end()

Callbacks are tiny objects (below): EMA (an average of the weights), ClampPixels (the image range),
Log (every `every` steps and at the last), Checkpoint (every `every` steps into a work directory,
which also gives the step to resume at; a Throttle spaces them in time). They run in list order
after the update, so an EMA before a Checkpoint is saved updated. Gradient clipping and the lr
schedule belong to the update itself (clipping sits between backward and step), so they are Optim's
fields; DDP is the step function's (it calls the model through ddist.runtime.distributed.wrap).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddist.errors import DivergenceError
from ddist.logging import info, progress
from ddist.runtime import distributed
from ddist.runtime.artifacts import atomic_path, torch_save

CHECKPOINT = "partial.pt"

StepFn = Callable[[int, Any], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


@dataclass
class Optim:
    """One update: the optimiser over `params`, their gradients clipped to norm `clip_grad_norm`
    (None: not clipped), then the per-step lr `schedule` (None: constant). `scaler` scales fp16
    losses (a disabled GradScaler, the default, changes nothing). `clip` replaces the one norm over
    all `params` where they hold several models, each clipped alone (ddist.training.cohort)."""

    optimizer: torch.optim.Optimizer
    params: Sequence[torch.Tensor]
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    clip_grad_norm: float | None = None
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    clip: Callable[[float], None] | None = None  # clip(max_norm): clip the gradients of each model alone

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            if self.clip is None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
            else:
                self.clip(self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.schedule is not None:
            self.schedule.step()

    def lr(self) -> float:
        """The lr of the last update (the first parameter group's)."""
        if self.schedule is not None:
            return float(self.schedule.get_last_lr()[0])
        return float(self.optimizer.param_groups[0]["lr"])


@dataclass
class Loop:
    """What a loop runs: `total` steps from `start`, its progress bar `desc`; `stage` and `hint` name
    the loss and what to change in the error a non-finite loss raises."""

    total: int
    desc: str
    stage: str
    hint: str
    start: int = 0
    bar: bool = True  # a progress bar (False where the caller shows its own)


class Callback:
    """A hook into the loop: on_step after each update (done = steps finished), on_end after the last."""

    def on_step(self, done: int, loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        pass

    def on_end(self) -> None:
        pass


def run_loop(step_fn: StepFn, batches: Iterable[Any], optim: Optim, callbacks: list[Callback], loop: Loop) -> None:
    """Run steps loop.start .. loop.total - 1 on the next batches of `batches` (a resumed classifier
    stream already skipped the batches trained on; an endless one is restored by its checkpoint)."""
    it = iter(batches)
    steps: Iterable[int] = range(loop.start, loop.total)
    if loop.bar:
        steps = progress(steps, desc=loop.desc, initial=loop.start, total=loop.total)
    for step, batch in zip(steps, it, strict=False):
        loss, parts = step_fn(step, batch)
        check_finite(loss, loop.stage, step, loop.hint)
        optim.update(loss)
        for callback in callbacks:
            callback.on_step(step + 1, loss, parts)
    for callback in callbacks:
        callback.on_end()


class EMA(Callback):
    """Steps an average of the weights (ddist.models.diffusion.WeightAverage) after every update."""

    def __init__(self, average) -> None:
        self.average = average

    def on_step(self, done: int, loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        self.average.step()


class ClampPixels(Callback):
    """Keeps optimised pixels inside the image range after every update: per-channel (low, high)."""

    def __init__(self, x: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.x, self.bounds = x, bounds

    def on_step(self, done: int, loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.x.clamp_(*self.bounds)


class Log(Callback):
    """write(done, loss, parts) every `every` steps and after the last of `total`."""

    def __init__(self, every: int, total: int, write: Callable[[int, torch.Tensor, Mapping], None]) -> None:
        self.every, self.total, self.write = every, total, write

    def on_step(self, done: int, loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        if done % self.every == 0 or done == self.total:
            self.write(done, loss, parts)


class Throttle:
    """Spaces checkpoints in time: of the steps where one is due, take(step) says yes to the first that
    comes at least `seconds` after the last one taken (or after the Throttle was made); 0: to all.
    It decides once per step, so the Checkpoints that share one (a cohort's students) save at the
    same steps and resume together. A kill then loses at most `seconds` plus one saving period."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = seconds, clock
        self.last = clock()
        self.decided = (-1, False)  # (step, taken) of the last decision

    def take(self, step: int) -> bool:
        if self.decided[0] != step:
            now = self.clock()
            taken = now - self.last >= self.seconds
            if taken:
                self.last = now
            self.decided = (step, taken)
        return self.decided[1]


class Checkpoint(Callback):
    """Every `every` steps (but the last), where `throttle` takes it (default: always), rank 0 saves
    `parts` (anything with state_dict) into work_dir's partial checkpoint (save_partial); resume()
    loads it and says the step to start at; the finished loop removes it (its caller keeps the
    result). No work_dir: off."""

    def __init__(
        self,
        work_dir: Path | None,
        every: int,
        total: int,
        parts: Mapping[str, Any],
        throttle: Throttle | None = None,
    ) -> None:
        self.work_dir, self.every, self.total, self.parts = work_dir, every, total, parts
        self.throttle = throttle if throttle is not None else Throttle(0.0)

    def resume(self, desc: str) -> int:
        start = resume(self.work_dir, self.parts)
        if start:
            info(f"{desc}: resuming at step {start}/{self.total}")
        return start

    def on_step(self, done: int, loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        if self.work_dir is None or done % self.every or done >= self.total:
            return
        if self.throttle.take(done) and distributed.is_main():
            save_partial(self.work_dir, done, self.parts)

    def on_end(self) -> None:
        if self.work_dir is not None and distributed.is_main():
            (self.work_dir / CHECKPOINT).unlink(missing_ok=True)


def check_finite(loss: torch.Tensor, stage: str, step: int, hint: str) -> None:
    if not torch.isfinite(loss):
        raise DivergenceError(
            f"The {stage} loss became {loss.item()} at iteration {step}. {hint} "
            "Earlier artifacts are left as they were."
        )


def save_partial(work_dir: Path, step: int, parts: Mapping[str, Any]) -> None:
    """Checkpoint the state of `parts` (anything with state_dict: model, optimiser, schedule, a
    resumable data stream), the step and the global RNG states into the work directory, atomically."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(step=step, torch_rng=torch.get_rng_state(), cuda_rng=_cuda_rng_states())
    with atomic_path(work_dir / CHECKPOINT) as tmp:
        torch_save(state, tmp)


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
