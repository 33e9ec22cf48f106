"""A cohort: up to `evaluate.parallel` students trained together in one loop on the engine.

The students of one evaluation share everything but their initialisation and, where they evaluate
different sets (the set and its random-real baseline), their images: the batch plan is drawn from
the seed alone, so all of them replay the same batches. A cohort steps them in lockstep:

    for each planned batch (one per set, zipped):
        x_s = the augmented, mixed batch of each set s            once per set, not per student
        t_s = the teacher's logits on x_s (soft protocol, online)  once per set, not per student
        for each stack (the cohort's students of one architecture): its logits, [B, K, classes]
        loss = sum over students of the student's own loss (its logits, its set's targets)
        one optimiser update over all the students' parameters

A summed loss gives each student exactly its own gradient, and SGD/AdamW update each parameter
alone, so this is K separate trainings. `evaluate.stacking` says how a stack computes its K copies:
`grouped` as one stacked model (ddist.models.stack: grouped convolutions, equal to the copies within
float rounding) or `none`, each copy its own forward (byte-identical to training each student alone).
Gradient clipping is per student. Each student checkpoints (at the end of an epoch, `checkpoint_interval`
seconds after the last) into its own store entry in the format of a student trained alone, so a killed
cohort resumes, alone or in any cohort.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ddist.config.schema import AnyConfig
from ddist.data.augment import mix_targets, split_mix
from ddist.data.plan import augmented_batch, plan, plan_settings, stored_batches
from ddist.models import build_model
from ddist.models.stack import NotStackable, copy_state, load_copy_state, stack_models
from ddist.objectives.distill import hard_label_loss, soft_label_loss
from ddist.runtime import distributed
from ddist.runtime.artifacts import DistilledSet
from ddist.runtime.context import RunContext
from ddist.training.engine import Callback, Checkpoint, Log, Loop, Optim, Throttle, run_loop
from ddist.training.loop import (
    autocast,
    epochs_for,
    make_optimizer,
    make_schedule,
    real_batches,
    seed_everything,
    student_precision,
)
from ddist.utils import ceil_div


@dataclass
class Source:
    """One evaluated set of a cohort, and its stored soft labels' directory (None: online or hard)."""

    distilled: DistilledSet
    stored: Path | None = None


@dataclass
class Member:
    """One student of a cohort: its model config, repeat (its seed), set (index into the sources),
    store entry directory (its checkpoint) and W&B name (`key`/loss, `key`/test_acc)."""

    model_cfg: dict
    repeat: int
    source: int
    work: Path | None
    key: str


@dataclass
class Shared:
    """What every student of the cohort shares: the evaluate settings, the teacher (soft protocol,
    online labels; else None), the scored split, and whether same-architecture students run as one
    stacked model (`evaluate.stacking` resolved)."""

    ev: DictConfig
    teacher: torch.nn.Module | None
    test: Any
    grouped: bool


class CohortNet(torch.nn.Module):
    """The cohort's stacks as one module: forward(inputs per set) -> logits per stack, [B, K, classes]."""

    def __init__(self, stacks: Sequence[torch.nn.Module], sources: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.stacks = torch.nn.ModuleList(stacks)
        self.sources = [list(s) for s in sources]  # per stack: the set each copy reads

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [
            stack(torch.cat([inputs[s] for s in srcs], dim=1))
            for stack, srcs in zip(self.stacks, self.sources, strict=False)
        ]


def build_stacks(
    members: Sequence[Member], models: Sequence[torch.nn.Module], grouped: bool
) -> tuple[CohortNet, list[tuple[int, int]]]:
    """The cohort's module and, per member, (its stack, its copy in the stack): same-architecture
    members form one stack when `grouped` (an architecture stack_models refuses: one stack each)."""
    by_arch: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        arch = repr(sorted(m.model_cfg.items())) if grouped else str(i)
        by_arch.setdefault(arch, []).append(i)
    stacks: list[torch.nn.Module] = []
    sources: list[list[int]] = []
    where = [(0, 0)] * len(members)
    for idx in by_arch.values():
        try:
            groups, stacked = [idx], [stack_models([models[i] for i in idx])]
        except NotStackable:
            groups = [[i] for i in idx]
            stacked = [stack_models([models[i]]) for i in idx]
        for group, stack in zip(groups, stacked, strict=True):
            for k, i in enumerate(group):
                where[i] = (len(stacks), k)
            stacks.append(stack)
            sources.append([members[i].source for i in group])
    return CohortNet(stacks, sources), where


def train_cohort(
    cfg: AnyConfig, ctx: RunContext, shared: Shared, sources: Sequence[Source], members: Sequence[Member]
) -> list[float]:
    """Train `members` together on `sources` (same size, same plan) and return their test accuracies."""
    ev, spec, device = shared.ev, ctx.spec, ctx.device
    first = sources[0].distilled
    images = [s.distilled.images.to(device) for s in sources]
    labels = [s.distilled.labels.to(device) for s in sources]

    # -- setup: each student initialised exactly as if trained alone, then stacked
    models = []
    for m in members:
        seed_everything(cfg.seed * 1000 + m.repeat)
        models.append(build_model(m.model_cfg, spec.num_classes, spec.channels, spec.resolution).to(device))
    net, where = build_stacks(members, models, shared.grouped)
    layout = torch.channels_last if ev.channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    epochs = epochs_for(ev.epochs, first.ipc)
    settings = plan_settings(ev, spec.resolution, cfg.seed, len(first.labels), epochs)
    streams = [
        stored_batches(s.stored, settings, ctx.require("teacher")) if s.stored else plan(settings) for s in sources
    ]
    steps_per_epoch = ceil_div(len(first.labels), settings["batch_size"])
    total = epochs * steps_per_epoch
    optimizer = make_optimizer(net.parameters(), ev)
    schedule = make_schedule(optimizer, ev, total)
    precision = student_precision(ev.precision, cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    optim = Optim(optimizer, list(net.parameters()), schedule, ev.clip_grad_norm, scaler)
    if len(members) > 1:
        optim.clip = per_copy_clip(net)
    throttle = Throttle(cfg.checkpoint_interval)  # one for all: the students checkpoint at the same steps
    checkpoints = [
        Checkpoint(
            m.work,
            steps_per_epoch,
            total,
            member_parts(net, optimizer, where[i], {"schedule": schedule, "scaler": scaler}),
            throttle,
        )
        for i, m in enumerate(members)
    ]
    starts = {c.resume(f"student {m.key}") for c, m in zip(checkpoints, members, strict=False)}
    if len(starts) > 1:
        raise RuntimeError(f"a cohort's students resume at different steps {sorted(starts)}: form cohorts by step")
    start = starts.pop()
    forward = distributed.wrap(net)  # DDP under torchrun (one student per cohort there)
    # torch.compile of a Module returns a Module (OptimizedModule); its stubs only promise a callable
    forward = cast(torch.nn.Module, torch.compile(forward)) if cfg.compile else forward
    net.train()

    def targets(xs: list[torch.Tensor], batches: Sequence[dict], part: slice) -> list[torch.Tensor]:
        """Per set: its mixed one-hot labels (hard), stored logits, or the teacher's logits on x."""
        out = []
        for s, (x, batch) in enumerate(zip(xs, batches, strict=False)):
            if ev.protocol == "hard":
                one_hot = F.one_hot(labels[s][batch["indices"].to(device)], spec.num_classes).float()
                out.append(mix_targets(one_hot, split_mix(batch)[1])[part])
            elif "logits" in batch:
                out.append(batch["logits"][part].to(device))
            else:
                assert shared.teacher is not None, "the soft protocol loads the teacher"
                with torch.no_grad():
                    out.append(shared.teacher(x))
        return out

    def step_fn(step: int, batches: Sequence[dict]) -> tuple[torch.Tensor, dict]:
        with autocast(precision, device.type):
            xs = [
                augmented_batch(img, batch, device).contiguous(memory_format=layout)
                for img, batch in zip(images, batches, strict=False)
            ]
            part, weight = distributed.my_part(len(xs[0]))  # all of it in one process
            xs = [x[part] for x in xs]
            goal = targets(xs, batches, part)
            logits = forward(xs)
            losses = {}
            for m, (g, k) in zip(members, where, strict=False):
                out = logits[g][:, k]
                loss = (
                    hard_label_loss(out, goal[m.source])
                    if ev.protocol == "hard"
                    else soft_label_loss(out, goal[m.source], ev.temperature)
                )
                losses[m.key] = weight * loss
        first, *rest = losses.values()
        return sum(rest, first), losses  # one student: its own loss tensor, as when trained alone

    def write(done: int, loss: torch.Tensor, parts: Mapping) -> None:
        for key, value in parts.items():
            ctx.logger.log({f"{key}/loss": value.item(), f"{key}/lr": optim.lr()}, step=done)

    def scores() -> list[float]:
        return distributed.from_main(
            lambda: cohort_accuracy(net, where, shared.test, ctx, (ev.test_batch_size, layout), precision)
        )

    callbacks: list[Callback] = [Log(ev.log_every, total, write)]
    if ev.eval_every > 0:

        def write_test(done: int, loss: torch.Tensor, parts: Mapping) -> None:
            if done < total:
                for m, acc in zip(members, scores(), strict=False):
                    ctx.logger.log({f"{m.key}/test_acc": acc}, step=done)
                net.train()  # scoring leaves it in eval mode

        callbacks.append(Log(ev.eval_every * steps_per_epoch, total, write_test))
    callbacks += checkpoints
    name = members[0].key.rsplit("/", 1)[-1] if len(members) == 1 else f"{len(members)} students"
    loop = Loop(total=total, desc=f"student {name}", stage="evaluate", hint="Lower evaluate.lr.", start=start)
    run_loop(step_fn, _replayed(streams, start), optim, callbacks, loop)
    accs = scores()
    for m, acc in zip(members, accs, strict=False):
        ctx.logger.log({f"{m.key}/test_acc": acc}, step=total)
    return accs


def _replayed(streams: Sequence[Any], start: int):
    """The sets' batch streams zipped, after the `start` batches already trained on."""
    it = zip(*streams, strict=False)
    for _ in range(start):
        next(it)
    return it


@torch.no_grad()
def cohort_accuracy(
    net: CohortNet,
    where: Sequence[tuple[int, int]],
    ds: Any,
    ctx: RunContext,
    batching: tuple[int, torch.memory_format],
    precision: str,
) -> list[float]:
    """Top-1 accuracy (a fraction) of every member on a real split, all from one pass over it
    (`batching`: the batch size and the layout of the students' inputs), under the autocast
    `precision` they trained in."""
    batch_size, layout = batching
    net.eval()
    correct = [0] * len(where)
    total = 0
    for x, y in real_batches(ds, ctx.spec, batch_size, shuffle=False):
        x = x.to(ctx.device).contiguous(memory_format=layout)
        with autocast(precision, ctx.device.type):
            logits = net([x] * (1 + max(max(s) for s in net.sources)))
        for i, (g, k) in enumerate(where):
            correct[i] += int((logits[g][:, k].argmax(1).cpu() == y).sum())
        total += len(y)
    return [c / max(total, 1) for c in correct]


# ----------------------------------------------------------------------------- one student's view


class _CopyModel:
    """state_dict / load_state_dict of one copy of a stack: the plain model's checkpoint."""

    def __init__(self, stack: torch.nn.Module, k: int, copies: int) -> None:
        self.stack, self.k, self.copies = stack, k, copies

    def state_dict(self) -> dict[str, torch.Tensor]:
        return copy_state(self.stack.state_dict(), self.k, self.copies)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_copy_state(self.stack, self.k, self.copies, state)


class _CopyOptimizer:
    """state_dict / load_state_dict of one copy's share of the cohort's optimiser: the state an
    optimiser over that copy's model alone would have (its parameters numbered 0, 1, ...)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], k: int, copies: int) -> None:
        self.optimizer, self.params, self.k, self.copies = optimizer, params, k, copies

    def _slice(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.chunk(self.copies)[self.k].clone()
        return value.clone() if isinstance(value, torch.Tensor) else value

    def state_dict(self) -> dict:
        state = {
            i: {name: self._slice(v) for name, v in self.optimizer.state[p].items()}
            for i, p in enumerate(self.params)
            if p in self.optimizer.state
        }
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.params)))}
            for g in self.optimizer.param_groups
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        for i, values in saved["state"].items():
            p = self.params[int(i)]
            own = self.optimizer.state[p]
            for name, v in values.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    if name not in own:
                        own[name] = torch.zeros(
                            (self.copies * v.shape[0], *v.shape[1:]), dtype=v.dtype, device=p.device
                        )
                    own[name].chunk(self.copies)[self.k].copy_(v)
                else:
                    own[name] = v.clone() if isinstance(v, torch.Tensor) else v
        for group, saved_group in zip(self.optimizer.param_groups, saved["param_groups"], strict=False):
            group.update({k: v for k, v in saved_group.items() if k != "params"})


def member_parts(
    net: CohortNet, optimizer: torch.optim.Optimizer, where: tuple[int, int], shared: Mapping[str, Any]
) -> dict[str, Any]:
    """A member's checkpoint parts: its copy of the model and of the optimiser, and the `shared`
    schedule and scaler (equal for all), in the format of a student trained alone."""
    g, k = where
    stack = net.stacks[g]
    copies = len(net.sources[g])
    return {
        "model": _CopyModel(stack, k, copies),
        "optimizer": _CopyOptimizer(optimizer, list(stack.parameters()), k, copies),
        **shared,
    }


def per_copy_clip(net: CohortNet) -> Callable[[float], None]:
    """clip(max_norm): every copy's gradients clipped to norm max_norm alone, as
    torch.nn.utils.clip_grad_norm_ clips one model's (coefficient max_norm / (norm + 1e-6), at most 1)."""

    def clip(max_norm: float) -> None:
        for stack, srcs in zip(net.stacks, net.sources, strict=False):
            copies = len(srcs)
            grads = [p.grad for p in stack.parameters() if p.grad is not None]
            if not grads:
                continue
            sq = torch.stack([g.detach().reshape(copies, -1).float().pow(2).sum(1) for g in grads]).sum(0)
            coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.detach().mul_(
                    coef.to(g.dtype).view(copies, *[1] * (g.dim() - 1)).repeat_interleave(g.shape[0] // copies, 0)
                )

    return clip
