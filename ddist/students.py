"""Students: train fresh models on a DistilledSet and test them on the real test split.

Used by the evaluate stage (the run's students) and the analyse stage (DD-Ranking's
baselines). Protocols (conf/evaluate/):
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
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ddist.artifacts import (
    DistilledSet,
    atomic_write_text,
    building,
    cache_entry,
    file_sha256,
    load_distilled,
    tensor_checksum,
)
from ddist.data import load_split
from ddist.data.augment import augment_key, mix_targets, split_mix
from ddist.data.plan import augmented_batch, plan, plan_settings, stored_batches
from ddist.logging import info
from ddist.models import build_model, student_config
from ddist.objectives.distill import hard_label_loss, soft_label_loss
from ddist.teacher import load_teacher
from ddist.train import (
    accuracy,
    epochs_for,
    fit,
    make_optimizer,
    make_schedule,
    seed_everything,
)


def evaluate_set(
    cfg: DictConfig, ctx: dict, distilled_path: str | Path, overrides: dict | None = None, stored: Path | None = None
) -> list[dict]:
    """Train and test every configured student `repeats` times on one DistilledSet.

    `overrides` changes evaluate settings for this call only (e.g. {"protocol": "hard"} or
    {"mix": "none"}), which the analyse stage uses for its baselines. `stored` is a relabel
    directory whose soft labels replace the online teacher (soft protocol only). Each
    (set, student, repeat) keeps its accuracy in a cache entry, so a rerun (after a kill,
    or a sweep over other evaluate settings) trains only the students not yet finished.
    """
    ev = cast(DictConfig, OmegaConf.merge(cfg.evaluate, overrides or {}))
    distilled = load_distilled(distilled_path, ctx["spec"])
    test = load_split(cfg.dataset, "test", Path(cfg.paths.cache_dir))
    teacher = load_teacher(cfg, ctx) if ev.protocol == "soft" else None
    stored = stored if ev.protocol == "soft" else None
    base_key = student_base_key(cfg, ev, distilled, ctx)
    results = []
    for entry in ev.students:
        name, model_cfg = student_config(entry)
        accs = []
        for repeat in range(ev.repeats):
            work = cache_entry(cfg, "student", {**base_key, "student": model_cfg, "repeat": repeat})
            with building(work):
                accs.append(
                    finished_or_trained(cfg, ctx, ev, distilled, name, model_cfg, repeat, teacher, stored, test, work)
                )
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


def student_base_key(cfg: DictConfig, ev: DictConfig, distilled: DistilledSet, ctx: dict) -> dict:
    """What a student's accuracy depends on besides its architecture and repeat: the set's tensors,
    the evaluate settings, the seed, the test split and (soft protocol) the teacher's weights."""
    settings = cast("dict[str, Any]", OmegaConf.to_container(ev, resolve=True, enum_to_str=True))
    for key in ("distilled", "students", "repeats", "test_batch_size"):
        settings.pop(key, None)
    settings["augment"] = augment_key(settings["augment"])
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    dataset.pop("protocol", None)
    return {
        "set": distilled.meta.get("sha256") or tensor_checksum(distilled.images, distilled.labels),
        "evaluate": settings,
        "seed": cfg.seed,
        "dataset": dataset,
        "precision": cfg.precision,
        "teacher": file_sha256(ctx["teacher"]) if ev.protocol == "soft" else None,
    }


def finished_or_trained(
    cfg: DictConfig,
    ctx: dict,
    ev: DictConfig,
    distilled: DistilledSet,
    name: str,
    model_cfg: dict,
    repeat: int,
    teacher: torch.nn.Module | None,
    stored: Path | None,
    test,
    work: Path,
) -> float:
    """The accuracy kept in `work` by an earlier run, or a student trained (resumably) now."""
    result = work / "result.json"
    if result.is_file():
        info(f"student {name} repeat {repeat}: finished earlier ({result})")
        return float(json.loads(result.read_text())["acc"])
    acc = train_student(cfg, ctx, ev, distilled, name, model_cfg, repeat, teacher, stored, test, work)
    atomic_write_text(result, json.dumps({"acc": acc}))
    return acc


def train_student(
    cfg: DictConfig,
    ctx: dict,
    ev: DictConfig,
    distilled: DistilledSet,
    name: str,
    model_cfg: dict,
    repeat: int,
    teacher: torch.nn.Module | None,
    stored: Path | None,
    test,
    work: Path | None = None,
) -> float:
    """One student: the recipe is setup, fit on the planned batches, test."""
    spec, device = ctx["spec"], ctx["device"]
    images = distilled.images.to(device)
    labels = distilled.labels.to(device)

    # -- setup
    seed_everything(cfg.seed * 1000 + repeat)
    student = build_model(model_cfg, spec.num_classes, spec.channels, spec.resolution).to(device)
    epochs = epochs_for(ev.epochs, distilled.ipc)
    settings = plan_settings(ev, spec.resolution, cfg.seed, len(labels), epochs)
    batches = stored_batches(stored, settings, ctx["teacher"]) if stored else plan(settings)
    steps_per_epoch = -(-len(labels) // settings["batch_size"])
    optimizer = make_optimizer(student.parameters(), ev)
    schedule = make_schedule(optimizer, ev, epochs * steps_per_epoch)

    def loss_fn(student, batch):
        x = augmented_batch(images, batch, device)
        out = student(x)
        if ev.protocol == "hard":
            _, mix = split_mix(batch)
            return hard_label_loss(
                out, mix_targets(F.one_hot(labels[batch["indices"].to(device)], spec.num_classes).float(), mix)
            )
        if "logits" in batch:
            return soft_label_loss(out, batch["logits"].to(device), ev.temperature)
        assert teacher is not None, "the soft protocol loads the teacher"
        with torch.no_grad():
            target = teacher(x)
        return soft_label_loss(out, target, ev.temperature)

    # -- loop, then test
    key = f"evaluate/{name}_r{repeat}"
    fit(
        student,
        batches,
        loss_fn,
        optimizer,
        schedule,
        total_steps=epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        stage="evaluate",
        hint="Lower evaluate.lr.",
        logger=ctx["logger"],
        log_every=ev.log_every,
        desc=f"student {name} {repeat}",
        clip_grad_norm=ev.clip_grad_norm,
        work_dir=work,
        log_key=key,
        precision=cfg.precision,
        compile=cfg.compile,
    )
    acc = accuracy(student, test, spec, device, ev.test_batch_size)
    ctx["logger"].log({f"{key}/test_acc": acc}, step=epochs * steps_per_epoch)
    return acc
