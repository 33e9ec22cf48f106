"""Students: train fresh models on a DistilledSet and test them on the real test split
(or, with `evaluate.split=val`, on the validation split carved from train).

Used by the evaluate stage (the run's students and, via ddist.training.baseline, the random-real
baseline's) and the analyse stage (DD-Ranking's baselines); `store_soft_labels` is the
relabel stage's storage, shared with the baseline. Protocols (conf/evaluate/):
- soft (SRe2L / RDED): KL(softmax(teacher/T) || softmax(student/T)), batch mean, on the same
  augmented and mixed batch; the teacher's logits come online or from the relabel stage's
  stored file set. No T^2 factor, as SRe2L's reference evaluation.
- hard (MiniMax diffusion family): cross-entropy on CutMix-ed one-hot labels.

The batch plan (indices, augmentation, mix) is drawn from `seed` alone, so every student
and repeat sees the same batches (as with stored labels) and repeats differ by their
initialisation (seeded by seed and repeat).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ddist.data import load_split
from ddist.data.augment import mix_targets, split_mix
from ddist.data.plan import augmented_batch, compress_logits, plan, plan_settings, stored_batches
from ddist.logging import info, progress
from ddist.models import build_model, student_config
from ddist.objectives.distill import hard_label_loss, soft_label_loss
from ddist.runtime import distributed, store
from ddist.runtime.artifacts import (
    DistilledSet,
    atomic_dir,
    atomic_write_text,
    file_sha256,
    load_distilled,
    tensor_checksum,
)
from ddist.runtime.context import RunContext
from ddist.training.engine import Loop, Optim
from ddist.training.loop import (
    Amp,
    Logging,
    accuracy,
    epochs_for,
    fit,
    make_optimizer,
    make_schedule,
    seed_everything,
)
from ddist.training.teacher import frozen_teacher, load_teacher
from ddist.utils import ceil_div


def evaluate_set(
    cfg: DictConfig,
    ctx: RunContext,
    distilled_path: str | Path,
    overrides: dict | None = None,
    stored: Path | None = None,
    log_as: str = "evaluate",
) -> list[dict]:
    """Train and test every configured student `repeats` times on one DistilledSet.

    `overrides` changes evaluate settings for this call only (e.g. {"protocol": "hard"} or
    {"mix": "none"}), which the analyse stage uses for its baselines. `stored` is a relabel
    directory whose soft labels replace the online teacher (soft protocol only); `log_as` is the
    W&B namespace of the students' curves (the baselines log under "baseline/..."). Each
    (set, student, repeat) keeps its accuracy in a cache entry, so a rerun (after a kill,
    or a sweep over other evaluate settings) trains only the students not yet finished.
    """
    ev = cast(DictConfig, OmegaConf.merge(cfg.evaluate, overrides or {}))
    distilled = load_distilled(distilled_path, ctx.spec)
    test = load_split(cfg.dataset, ev.split, Path(cfg.paths.cache_dir))  # "val" when choosing settings
    # online soft labels: the teacher runs under no_grad every student step, so its BN is folded away
    teacher = frozen_teacher(cfg, load_teacher(cfg, ctx)) if ev.protocol == "soft" else None
    stored = stored if ev.protocol == "soft" else None
    base_key = student_base_key(cfg, ev, distilled, ctx, stored)
    setting = Setting(ev, distilled, teacher, stored, test, log_as)
    results = []
    for entry in ev.students:
        name, model_cfg = student_config(entry)
        accs = []
        for repeat in range(ev.repeats):
            work = store.entry(cfg, "student", {**base_key, "student": model_cfg, "repeat": repeat})
            accs.append(finished_or_trained(cfg, ctx, setting, Student(name, model_cfg, repeat), work))
        results.append(
            {
                "name": name,
                "protocol": ev.protocol,
                "accs": accs,
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            }
        )
        info(f"student {name} ({ev.protocol}): {100 * results[-1]['acc_mean']:.2f}% over {len(accs)} repeat(s)")
    return results


# evaluate keys that do not change a student's accuracy (or are in its key otherwise: student, repeat)
_NOT_STUDENT_KEYS = ("distilled", "students", "repeats", "test_batch_size", "baseline", "log_every", "eval_every")


def student_base_key(
    cfg: DictConfig, ev: DictConfig, distilled: DistilledSet, ctx: RunContext, stored: Path | None = None
) -> dict:
    """What a student's accuracy depends on besides its architecture and repeat: the set's tensors,
    the evaluate settings, the seed, the scored split, (soft protocol) the teacher's weights and,
    with stored soft labels, how they were compressed (fp16, top-k), and the rank count that trains
    it (world(): DDP's ranks reach another accuracy than one process; 1 where rank 0 trains alone)."""
    settings = cast("dict[str, Any]", OmegaConf.to_container(ev, resolve=True, enum_to_str=True))
    for key in _NOT_STUDENT_KEYS:
        settings.pop(key, None)
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    dataset.pop("protocol", None)
    labels = {"stored": "fp16", "top_k": json.loads((stored / "meta.json").read_text())["top_k"]} if stored else None
    return {
        **({"labels": labels} if labels else {}),
        "set": distilled.meta.get("sha256") or tensor_checksum(distilled.images, distilled.labels),
        "evaluate": settings,
        "seed": cfg.seed,
        "dataset": dataset,
        "precision": cfg.precision,
        "teacher": file_sha256(ctx.require("teacher")) if ev.protocol == "soft" else None,
        "world_size": distributed.world(),
    }


@dataclass
class Setting:
    """What every student of one evaluation shares: the evaluate settings `ev`, the set, the teacher
    (soft protocol, online labels; else None), the stored soft labels' directory (or None), the test split."""

    ev: DictConfig
    distilled: DistilledSet
    teacher: torch.nn.Module | None
    stored: Path | None
    test: Any
    log_as: str = "evaluate"  # the W&B namespace of the students' curves


@dataclass
class Student:
    """One student run: its name, model config and repeat index."""

    name: str
    model_cfg: dict
    repeat: int


def finished_or_trained(
    cfg: DictConfig, ctx: RunContext, setting: Setting, student: Student, work: store.Entry
) -> float:
    """The accuracy kept in the store entry `work` by an earlier run, or a student trained (resumably,
    checkpointing into the entry) now; torchrun's ranks train it together."""
    trained: list[bool] = []

    def build(e: store.Entry) -> None:
        acc = train_student(cfg, ctx, setting, student, e.path)
        if distributed.is_main():
            atomic_write_text(e / "result.json", json.dumps({"acc": acc}))
        trained.append(True)

    acc = float(store.cached(work, build, lambda e: e.read_json("result.json", RESULT)["acc"], together=True))
    if not trained:
        info(f"student {student.name} repeat {student.repeat}: finished earlier ({work / 'result.json'})")
    return acc


# what a student entry's result.json must hold to be trusted
RESULT = store.fields(acc=store.FRACTION)


def train_student(cfg: DictConfig, ctx: RunContext, setting: Setting, run: Student, work: Path | None = None) -> float:
    """One student: the recipe is setup, fit on the planned batches, test."""
    ev, distilled, teacher, stored, test = setting.ev, setting.distilled, setting.teacher, setting.stored, setting.test
    name, model_cfg, repeat = run.name, run.model_cfg, run.repeat
    spec, device = ctx.spec, ctx.device
    images = distilled.images.to(device)
    labels = distilled.labels.to(device)

    # -- setup
    seed_everything(cfg.seed * 1000 + repeat)
    student = build_model(model_cfg, spec.num_classes, spec.channels, spec.resolution).to(device)
    epochs = epochs_for(ev.epochs, distilled.ipc)
    settings = plan_settings(ev, spec.resolution, cfg.seed, len(labels), epochs)
    batches = stored_batches(stored, settings, ctx.require("teacher")) if stored else plan(settings)
    steps_per_epoch = ceil_div(len(labels), settings["batch_size"])
    optimizer = make_optimizer(student.parameters(), ev)
    schedule = make_schedule(optimizer, ev, epochs * steps_per_epoch)

    def loss_fn(student, batch):
        x = augmented_batch(images, batch, device)
        part, weight = distributed.my_part(len(x))  # all of it in one process
        x = x[part]
        out = student(x)
        if ev.protocol == "hard":
            _, mix = split_mix(batch)
            targets = mix_targets(F.one_hot(labels[batch["indices"].to(device)], spec.num_classes).float(), mix)
            return weight * hard_label_loss(out, targets[part])
        if "logits" in batch:
            return weight * soft_label_loss(out, batch["logits"][part].to(device), ev.temperature)
        assert teacher is not None, "the soft protocol loads the teacher"
        with torch.no_grad():
            target = teacher(x)
        return weight * soft_label_loss(out, target, ev.temperature)

    # -- loop, then test
    key = f"{setting.log_as}/{name}_r{repeat}"
    fit(
        student,
        batches,
        loss_fn,
        Optim(optimizer, list(student.parameters()), schedule, ev.clip_grad_norm),
        Loop(
            total=epochs * steps_per_epoch, desc=f"student {name} {repeat}", stage="evaluate", hint="Lower evaluate.lr."
        ),
        Logging(
            ctx.logger,
            every=ev.log_every,
            steps_per_epoch=steps_per_epoch,
            key=key,
            test=lambda: distributed.from_main(lambda: accuracy(student, test, spec, device, ev.test_batch_size)),
            test_every=ev.eval_every,
        ),
        work_dir=work,
        amp=Amp(cfg.precision, cfg.compile),
    )
    acc = distributed.from_main(lambda: accuracy(student, test, spec, device, ev.test_batch_size))
    ctx.logger.log({f"{key}/test_acc": acc}, step=epochs * steps_per_epoch)
    return acc


# ----------------------------------------------------------------------------- stored soft labels


def store_soft_labels(cfg: DictConfig, ctx: RunContext, distilled_path: str | Path, out: Path) -> int:
    """The teacher's soft labels for `relabel.epochs` epochs of the batch plan evaluate draws for this
    set and seed, in fp16 (top-k when `relabel.top_k`), written atomically to `out`; returns the bytes.

    Used by the relabel stage (the run's set) and the random-real baseline, so both get exactly
    the same label protocol."""
    distilled = load_distilled(distilled_path, ctx.spec)
    teacher, device = frozen_teacher(cfg, load_teacher(cfg, ctx)), ctx.device
    epochs = epochs_for(cfg.relabel.epochs, distilled.ipc)
    settings = {
        **plan_settings(cfg.evaluate, cfg.dataset.resolution, cfg.seed, len(distilled.labels), epochs),
        "top_k": cfg.relabel.top_k,
        "teacher_sha256": file_sha256(ctx.require("teacher")),
    }
    steps_per_epoch = ceil_div(settings["num_images"], settings["batch_size"])
    with atomic_dir(out) as tmp, torch.inference_mode():
        epoch_tensors: dict[str, torch.Tensor] = {}
        for step, batch in enumerate(
            progress(plan(settings), desc="relabel", total=steps_per_epoch * settings["epochs"])
        ):
            logits = teacher(augmented_batch(distilled.images, batch, device)).float().cpu()
            stored = {**batch, **compress_logits(logits, settings["top_k"])}
            epoch_tensors.update({f"{step:07d}/{k}": v for k, v in stored.items()})
            if (step + 1) % steps_per_epoch == 0:
                _save_tensors(tmp / f"epoch_{step // steps_per_epoch:04d}.safetensors", epoch_tensors)
                epoch_tensors = {}
        nbytes = sum(f.stat().st_size for f in tmp.glob("epoch_*.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**settings, "bytes": nbytes}, indent=2))
    info(f"relabel: stored {settings['epochs']} epochs of soft labels, {nbytes / 1e6:.2f} MB in {out}")
    return nbytes


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
