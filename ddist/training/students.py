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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from ddist.config.schema import AnyConfig, StoredRelabelConfig, as_node
from ddist.data import load_split
from ddist.data.plan import augmented_batch, compress_logits, plan, plan_settings
from ddist.logging import info, progress
from ddist.models import student_config
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
from ddist.training.cohort import Member, Shared, Source, train_cohort
from ddist.training.engine import CHECKPOINT
from ddist.training.loop import epochs_for, student_precision
from ddist.training.teacher import frozen_teacher, load_teacher
from ddist.utils import ceil_div


@dataclass
class SetJob:
    """One set to evaluate: its DistilledSet directory, `overrides` of the evaluate settings for it
    alone (e.g. {"protocol": "hard"}, which the analyse stage's baselines use), `stored`: a relabel
    directory whose soft labels replace the online teacher (soft protocol only), and `log_as`: the
    W&B namespace of its students' curves (the baselines log under "baseline/...")."""

    path: str | Path
    overrides: dict | None = None
    stored: Path | None = None
    log_as: str = "evaluate"


def evaluate_set(cfg: AnyConfig, ctx: RunContext, job: SetJob) -> list[dict]:
    """evaluate_sets of one set."""
    return evaluate_sets(cfg, ctx, [job])[0]


def evaluate_sets(cfg: AnyConfig, ctx: RunContext, jobs: list[SetJob]) -> list[list[dict]]:
    """Train and test every configured student `repeats` times on each set of `jobs`; per job, per
    student architecture: its accuracies, mean and std.

    Each (set, student, repeat) keeps its accuracy in a store entry, so a rerun (after a kill, or a
    sweep over other evaluate settings) trains only the students not yet finished. Those are trained
    in cohorts of up to `evaluate.parallel` (ddist.training.cohort): students that replay the same
    batch plan (the same settings and set size, whichever set) step together in one loop and share
    each set's augmented batch and teacher logits.
    """
    runs: list[Run] = []
    for j, job in enumerate(jobs):
        ev = cast(DictConfig, OmegaConf.merge(cfg.evaluate, job.overrides or {}))
        stored = job.stored if ev.protocol == "soft" else None
        distilled = load_distilled(job.path, ctx.spec)
        base_key = student_base_key(cfg, ev, distilled, ctx, stored)
        source = Source(distilled, stored)  # one per set: its students share its batches and teacher logits
        for index, entry in enumerate(ev.students):
            name, model_cfg = student_config(entry)
            for repeat in range(ev.repeats):
                work = store.entry(cfg, "student", {**base_key, "student": model_cfg, "repeat": repeat})
                runs.append(Run(j, index, name, model_cfg, repeat, work, ev, source, job.log_as))
    accs = train_runs(cfg, ctx, runs)
    results: list[list[dict]] = [[] for _ in jobs]
    for j in range(len(jobs)):
        mine = [(r, a) for r, a in zip(runs, accs, strict=False) if r.job == j]
        for index in dict.fromkeys(r.student for r, _ in mine):  # an entry of evaluate.students (names may repeat)
            name = next(r.name for r, _ in mine if r.student == index)
            student_accs = [a for r, a in mine if r.student == index]
            ev = next(r.ev for r, _ in mine if r.student == index)
            protocol, precision = ev.protocol, student_precision(ev.precision, cfg.precision, ctx.device)
            results[j].append(
                {
                    "name": name,
                    "protocol": protocol,
                    "precision": precision,  # evaluate.precision resolved (auto: by the device)
                    "accs": student_accs,
                    "acc_mean": statistics.fmean(student_accs),
                    "acc_std": statistics.pstdev(student_accs) if len(student_accs) > 1 else 0.0,
                }
            )
            mean = 100 * results[j][-1]["acc_mean"]
            info(f"student {name} ({protocol}, {precision}): {mean:.2f}% over {len(student_accs)} repeat(s)")
    return results


@dataclass
class Run:
    """One student to have: its job, entry of evaluate.students, name, model config, repeat, store entry,
    evaluate settings and set."""

    job: int
    student: int
    name: str
    model_cfg: dict
    repeat: int
    work: store.Entry
    ev: DictConfig
    source: Source
    log_as: str

    @property
    def key(self) -> str:  # its W&B namespace
        return f"{self.log_as}/{self.name}_r{self.repeat}"


def train_runs(cfg: AnyConfig, ctx: RunContext, runs: list[Run]) -> list[float]:
    """Each run's accuracy: read from its finished store entry, or trained now, in cohorts."""
    for r in runs:
        if r.work.done:
            info(f"student {r.name} repeat {r.repeat}: finished earlier ({r.work / 'result.json'})")
    needs = Needs(cfg, ctx)
    accs: dict[Path, float] = {}
    for cohort in cohorts([r for r in runs if not r.work.done], parallel(cfg)):
        accs.update(zip((r.work.path for r in cohort), train_cohort_entries(cfg, ctx, needs, cohort), strict=False))
    for r in runs:  # finished earlier: read and checked (a damaged one is trained again, alone)
        if r.work.path not in accs:
            accs[r.work.path] = store.cached(r.work, _one(needs.build_for([r])), READ)
    return [accs[r.work.path] for r in runs]


def _one(build: Callable[[list[store.Entry]], None]) -> Callable[[store.Entry], None]:
    """A build of several entries as the build of one (store.cached's)."""
    return lambda e: build([e])


class Needs:
    """What trainings need, loaded once and only when a student is trained: the frozen teacher
    (soft protocol, online labels) and the scored splits."""

    def __init__(self, cfg: AnyConfig, ctx: RunContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self._teacher: torch.nn.Module | None = None
        self._tests: dict[str, Any] = {}

    def shared(self, ev: DictConfig) -> Shared:
        cfg, ctx = self.cfg, self.ctx
        if ev.protocol == "soft" and self._teacher is None:
            self._teacher = frozen_teacher(cfg, load_teacher(cfg, ctx))
        if ev.split not in self._tests:
            self._tests[ev.split] = load_split(cfg.dataset, ev.split, Path(cfg.paths.cache_dir))
        teacher = self._teacher if ev.protocol == "soft" else None
        return Shared(ev, teacher, self._tests[ev.split], grouped=stacking(cfg, ctx) == "grouped")

    def build_for(self, cohort: list[Run]) -> Callable[[list[store.Entry]], None]:
        """build(todo): train the runs of `cohort` whose entries are in `todo` together, write their results."""

        def build(todo: list[store.Entry]) -> None:
            paths = {e.path for e in todo}
            mine = list({r.work.path: r for r in cohort if r.work.path in paths}.values())
            sources = list({id(r.source): r.source for r in mine}.values())
            members = [
                Member(r.model_cfg, r.repeat, [id(s) for s in sources].index(id(r.source)), r.work.path, r.key)
                for r in mine
            ]
            accs = train_cohort(self.cfg, self.ctx, self.shared(mine[0].ev), sources, members)
            if distributed.is_main():
                for r, acc in zip(mine, accs, strict=False):
                    atomic_write_text(r.work / "result.json", json.dumps({"acc": acc}))

        return build


def _read_result(e: store.Entry) -> float:
    return float(e.read_json("result.json", RESULT)["acc"])


def train_cohort_entries(cfg: AnyConfig, ctx: RunContext, needs: Needs, cohort: list[Run]) -> list[float]:
    """Train one cohort under its entries' locks (torchrun: one student, all ranks together)."""
    build = needs.build_for(cohort)
    if distributed.active():
        return [store.cached(cohort[0].work, lambda e: build([e]), READ, together=True)]
    return store.cached_many([r.work for r in cohort], build, READ)


def cohorts(runs: list[Run], size: int) -> list[list[Run]]:
    """The runs in groups of at most `size` that can step together: the same evaluate settings (so
    the same plan, epochs and optimiser), the same set size, and the same step to resume at;
    same-architecture runs next to each other, so they stack."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        settings = cast("dict[str, Any]", OmegaConf.to_container(r.ev, resolve=True, enum_to_str=True))
        for key in _NOT_STUDENT_KEYS:  # which students and where they log do not change the loop
            settings.pop(key, None)
        together = json.dumps(
            [settings, len(r.source.distilled.labels), r.source.distilled.ipc, resume_step(r.work)],
            sort_keys=True,
            default=str,
        )
        groups.setdefault(together, []).append(r)
    out = []
    for group in groups.values():
        group.sort(key=lambda r: json.dumps(r.model_cfg, sort_keys=True))
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out


def resume_step(work: store.Entry) -> int:
    """The step a student's partial checkpoint resumes at (0: none, or unreadable)."""
    path = work / CHECKPOINT
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return 0


def parallel(cfg: AnyConfig) -> int:
    """`evaluate.parallel` resolved: students per cohort (auto: 8; torchrun: 1, DDP trains one at a time)."""
    if distributed.active():
        return 1
    value = cfg.evaluate.parallel
    return 8 if value == "auto" else int(value)


def stacking(cfg: AnyConfig, ctx: RunContext) -> str:
    """`evaluate.stacking` resolved: auto is grouped on CUDA and none on a CPU (scripts/bench_students.py)."""
    value = str(cfg.evaluate.stacking)
    if value == "auto":
        return "grouped" if ctx.device.type == "cuda" else "none"
    return value


# evaluate keys that do not change a student's accuracy (or are in its key otherwise: student, repeat);
# parallel, stacking and channels_last change how students are batched and laid out, which changes float
# rounding at most (as the device does, which no key holds either)
_NOT_STUDENT_KEYS = (
    "distilled",
    "students",
    "repeats",
    "test_batch_size",
    "baseline",
    "log_every",
    "eval_every",
    "parallel",
    "stacking",
    "channels_last",
)


def student_base_key(
    cfg: AnyConfig, ev: DictConfig, distilled: DistilledSet, ctx: RunContext, stored: Path | None = None
) -> dict:
    """What a student's accuracy depends on besides its architecture and repeat: the set's tensors,
    the evaluate settings, the seed, the scored split, (soft protocol) the teacher's weights and,
    with stored soft labels, how they were compressed (fp16, top-k), and the rank count that trains
    it (world(): DDP's ranks reach another accuracy than one process; 1 where rank 0 trains alone)."""
    settings = cast("dict[str, Any]", OmegaConf.to_container(ev, resolve=True, enum_to_str=True))
    for key in _NOT_STUDENT_KEYS:
        settings.pop(key, None)
    # the precision students train in, resolved (auto: by the device), keyed where the run's precision
    # was before evaluate.precision existed, so an fp32 student keeps its key
    precision = student_precision(settings.pop("precision"), cfg.precision, ctx.device)
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    dataset.pop("protocol", None)
    labels = {"stored": "fp16", "top_k": json.loads((stored / "meta.json").read_text())["top_k"]} if stored else None
    return {
        **({"labels": labels} if labels else {}),
        "set": distilled.meta.get("sha256") or tensor_checksum(distilled.images, distilled.labels),
        "evaluate": settings,
        "seed": cfg.seed,
        "dataset": dataset,
        "precision": precision,
        "teacher": file_sha256(ctx.require("teacher")) if ev.protocol == "soft" else None,
        "world_size": distributed.world(),
    }


# what a student entry's result.json must hold to be trusted
RESULT = store.fields(acc=store.FRACTION)
READ = _read_result


# ----------------------------------------------------------------------------- stored soft labels


def store_soft_labels(cfg: AnyConfig, ctx: RunContext, distilled_path: str | Path, out: Path) -> int:
    """The teacher's soft labels for `relabel.epochs` epochs of the batch plan evaluate draws for this
    set and seed, in fp16 (top-k when `relabel.top_k`), written atomically to `out`; returns the bytes.

    Used by the relabel stage (the run's set) and the random-real baseline, so both get exactly
    the same label protocol."""
    distilled = load_distilled(distilled_path, ctx.spec)
    teacher, device = frozen_teacher(cfg, load_teacher(cfg, ctx)), ctx.device
    relabel = cast(StoredRelabelConfig, cfg.relabel)  # called with relabel.mode=stored
    epochs = epochs_for(relabel.epochs, distilled.ipc)
    settings = {
        **plan_settings(as_node(cfg.evaluate), cfg.dataset.resolution, cfg.seed, len(distilled.labels), epochs),
        "top_k": relabel.top_k,
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
