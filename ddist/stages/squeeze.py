"""Squeeze: train (or load) the teacher on the real train split and report its test accuracy.

The checkpoint is cached under ${paths.cache_dir}/teacher/<hash> (ddist/runtime/store.py), keyed by exactly the
config that made it (dataset data fields + the teacher node), so a sweep over later
stages or over `seed` trains the teacher once. `teacher.checkpoint=PATH` uses an
existing state dict instead; `teacher.epochs=0` keeps the model's initial (e.g.
torchvision pretrained) weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ddist.config.schema import Config, as_node
from ddist.data import load_split
from ddist.data.augment import apply, sample_params
from ddist.logging import info
from ddist.runtime import distributed, store
from ddist.runtime.artifacts import atomic_write_text, load_checkpoint, load_model_state, save_checkpoint
from ddist.runtime.context import RunContext
from ddist.runtime.stages import Stage
from ddist.training.engine import Loop, Optim
from ddist.training.loop import (
    Amp,
    Logging,
    accuracy,
    fit,
    make_optimizer,
    make_schedule,
    real_batches,
    seed_everything,
)
from ddist.training.teacher import build_teacher, load_teacher, teacher_key
from ddist.utils import ceil_div

STAGE = Stage(name="squeeze", makes=frozenset({"teacher"}), shared=True)


def run(cfg: Config, ctx: RunContext) -> RunContext:
    spec, device = ctx.spec, ctx.device
    cache_dir = Path(cfg.paths.cache_dir)

    # -- an existing checkpoint: validate it against the model, then measure it
    if cfg.teacher.checkpoint:
        ctx.teacher = Path(cfg.teacher.checkpoint)
        model = load_teacher(cfg, ctx)
        ctx.teacher_acc = accuracy(model, load_split(cfg.dataset, "test", cache_dir), spec, device)
        _report(ctx, cached=False)
        return ctx

    # -- the cache (ddist/runtime/store.py): a hit skips training; a concurrent run waits for this one
    entry = store.entry(cfg, "teacher", teacher_key(cfg))
    trained: list[bool] = []

    def build(e: store.Entry) -> None:
        train_teacher(cfg, ctx, e.path)
        trained.append(True)

    def read(e: store.Entry) -> float:  # a damaged entry is rebuilt, rather than blamed on teacher.checkpoint
        load_model_state(build_teacher(cfg, spec), load_checkpoint(e / "teacher.pt", "teacher"), e / "teacher.pt", "")
        return float(e.read_json("meta.json", TEACHER_META)["test_acc"])

    ctx.teacher_acc = store.cached(entry, build, read, together=True)  # torchrun's ranks train it together
    ctx.teacher = entry / "teacher.pt"
    _report(ctx, cached=not trained)
    return ctx


# what the teacher entry's meta.json must hold to be trusted
TEACHER_META = store.fields(test_acc=store.FRACTION, epochs=store.COUNT)


def train_teacher(cfg: Config, ctx: RunContext, entry: Path) -> None:
    """Train the teacher into cache `entry` (teacher.pt, then meta.json with its test accuracy)."""
    spec, device = ctx.spec, ctx.device
    cache_dir = Path(cfg.paths.cache_dir)
    path, meta_path = entry / "teacher.pt", entry / "meta.json"

    # -- train on the real train split (resumable: fit checkpoints epochs into the entry, checkpoint_interval apart)
    seed_everything(cfg.teacher.seed)
    train, test = load_split(cfg.dataset, "train", cache_dir), load_split(cfg.dataset, "test", cache_dir)
    model = build_teacher(cfg, spec).to(device)
    tcfg = cfg.teacher
    steps_per_epoch = ceil_div(len(train.targets), tcfg.batch_size)
    optimizer = make_optimizer(model.parameters(), tcfg)
    schedule = make_schedule(optimizer, tcfg, max(tcfg.epochs * steps_per_epoch, 1))
    generator = torch.Generator().manual_seed(cfg.teacher.seed)
    augment = as_node(cfg.dataset.augment.student)

    def stream():  # (images, labels, augmentation) of every step: replayable from the seed alone
        for _ in range(tcfg.epochs):
            for x, y in real_batches(train, spec, tcfg.batch_size, True, generator, tcfg.num_workers):
                yield x, y, sample_params(len(y), augment, spec.resolution, generator)

    def loss_fn(model, batch):
        x, y, params = batch
        part, weight = distributed.my_part(len(y))  # all of it in one process
        return weight * F.cross_entropy(model(apply(x, params)[part].to(device)), y[part].to(device))

    steps = tcfg.epochs * steps_per_epoch
    fit(
        model,
        stream(),
        loss_fn,
        Optim(optimizer, list(model.parameters()), schedule, tcfg.clip_grad_norm),
        Loop(total=steps, desc="teacher", stage="squeeze", hint="Lower teacher.lr."),
        Logging(
            ctx.logger,
            every=tcfg.log_every,
            steps_per_epoch=steps_per_epoch,
            test=lambda: distributed.from_main(lambda: accuracy(model, test, spec, device)),
            test_every=tcfg.eval_every,
            checkpoint_interval=cfg.checkpoint_interval,
        ),
        work_dir=entry,
        amp=Amp(cfg.precision, cfg.compile),
    )

    # -- measure and cache on rank 0 (checkpoint first, meta last: meta marks a complete entry)
    def measure_and_cache() -> float:
        acc = accuracy(model, test, spec, device)
        save_checkpoint(path, model, {"test_acc": acc})
        atomic_write_text(meta_path, json.dumps({"test_acc": acc, "epochs": tcfg.epochs}))
        ctx.logger.log({"squeeze/test_acc": acc}, step=steps)  # the test-accuracy curve's last point
        return acc

    distributed.from_main(measure_and_cache)


def _report(ctx: RunContext, cached: bool) -> None:
    info(f"teacher test accuracy {ctx.teacher_acc:.4f} ({'cached' if cached else 'measured'}: {ctx.teacher})")
    ctx.logger.log({"squeeze/teacher_acc": ctx.teacher_acc})
