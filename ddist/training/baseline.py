"""The random-real baseline beside every result (`evaluate.baseline: random`).

Every run also evaluates `ipc` real train images per class, drawn with the run's seed
(data/subsets.pick_random_real, so one (dataset, ipc, seed) is always the same set and its
students hit the cache across a sweep's methods), with exactly the run's students, epochs,
seed, scored split and label protocol: with `relabel.mode: stored` its soft labels are
stored the same way (fp16, top-k) as the run's set's. When the run's set is the random-real
set itself (pipeline=random), it is its own baseline and nothing is trained twice.

Per student: gain_pp = 100 (acc - baseline acc), in percentage points, and DD-Ranking's
improvement over random, IOR = Acc(syn, any) - Acc(rdm, any): the accuracy on the
synthetic set minus that on a randomly selected real set of the same compression ratio
under the same personalised evaluation (Li et al., "DD-Ranking: Rethinking the Evaluation
of Dataset Distillation", arXiv:2505.13300; the DD-Ranking README's "Benchmark" section).
It needs no full-dataset accuracy, so it is defined whenever the baseline ran; as a
fraction it is gain_pp / 100 (ddist.metrics.robust.improvement_over_random).

With `analyse.robust_scores=true`, robust_baselines trains the other students DD-Ranking's
HLR, LRS and ARS need (hard labels, the full real split, augmentation off).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from ddist.config.schema import AnyConfig
from ddist.data import class_indices, load_split
from ddist.data.subsets import save_random_real
from ddist.metrics import robust
from ddist.metrics.robust import improvement_over_random
from ddist.runtime import distributed, store
from ddist.runtime.artifacts import atomic_write_text, save_distilled
from ddist.runtime.context import RunContext
from ddist.training.students import SetJob, evaluate_set, evaluate_sets, store_soft_labels


def baseline_job(cfg: AnyConfig, ctx: RunContext) -> SetJob | None:
    """The random-real set to evaluate beside the run's (written now), or None: `evaluate.baseline:
    none`, or the run's set is the random-real set itself (pipeline=random)."""
    if cfg.evaluate.baseline == "none" or is_random_real(cfg):
        return None
    out = ctx.run_dir / "baseline"
    # the run's label protocol: soft labels stored like the set's (relabel stage), or online
    stored = out / "relabel" if ctx.relabel is not None else None

    def write_set() -> Path:  # rank 0 writes; torchrun's other ranks read
        train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
        path = save_random_real(out / "random_real", train, ctx.spec, cfg.ipc, cfg.seed)
        if stored is not None:
            store_soft_labels(cfg, ctx, path, stored)
        return path

    return SetJob(distributed.from_main(write_set), stored=stored, log_as="baseline/random")


def baseline_record(cfg: AnyConfig, ctx: RunContext, job: SetJob | None, students: list[dict]) -> dict | None:
    """The baseline's record for results.json (None with `evaluate.baseline: none`): `students` are
    the baseline set's students (the run's own where the set is the random-real set)."""
    if cfg.evaluate.baseline == "none":
        return None
    path = str(ctx.distilled) if job is None else str(job.path)
    return {"kind": "random", "set": path, "same_as_set": job is None, "students": students}


def is_random_real(cfg: AnyConfig) -> bool:
    """Whether the evaluated set is the random stage's output, i.e. the baseline itself."""
    return "random" in cfg.pipeline.stages and not cfg.evaluate.distilled


def with_gains(students: list[dict], baseline: dict | None) -> list[dict]:
    """The students' results with their baseline accuracy, gain (points) and IOR (fraction) added."""
    if baseline is None:
        return students
    base = {(b["name"], b["protocol"]): b for b in baseline["students"]}
    out = []
    for s in students:
        b = base[(s["name"], s["protocol"])]
        ior = improvement_over_random(s["acc_mean"], b["acc_mean"])
        out.append(
            {
                **s,
                "baseline_acc_mean": b["acc_mean"],
                "baseline_acc_std": b["acc_std"],
                "gain_pp": 100 * ior,
                "ior": ior,
            }
        )
    return out


# ----------------------------------------------------------------------------- DD-Ranking's robust scores

# Evaluate settings that switch augmentation off for ARS's "without augmentation" runs.
NO_AUGMENT = {"augment": {"crop_scale": None, "flip": False, "roll": 0}, "mix": "none"}


def robust_baselines(cfg: AnyConfig, ctx: RunContext, train, out_dir: Path) -> dict:
    """Train the students DD-Ranking's scores need and combine their accuracies.

    Runs (first configured student, `evaluate.repeats` repeats each):
      syn           the set under the run's protocol (taken from the evaluate stage when it ran)
      random        random real images at the same IPC, same protocol (seed-matched)
      syn_hard      the set under the hard-label protocol (`analyse.hard`, = evaluate/hard)
      real_hard     the full real train split, hard labels; cached, or `analyse.real_hard_acc`
      syn_noaug, random_noaug   both sets with augmentation and mixing off
    """
    acfg, ev = cfg.analyse, cfg.evaluate
    student = ev.students[0]
    # Baselines use online soft labels: stored ones belong to the distilled set only, and
    # online labels give the same batches (see relabel).
    same = {"students": [student]}
    hard = {**cast("dict[str, Any]", OmegaConf.to_container(acfg.hard)), "students": [student], "repeats": ev.repeats}

    distilled = ctx.require("distilled")
    random_path = save_random_real(out_dir / "random_real", train, ctx.spec, cfg.ipc, cfg.seed)
    done = [s for s in ctx.results.get("students", []) if s["protocol"] == ev.protocol]
    jobs = {  # one evaluation: the students that replay one plan train together (ddist.training.cohort)
        "syn": None if done else SetJob(distilled, same),
        "random": SetJob(random_path, same),
        "syn_hard": None if ev.protocol == "hard" else SetJob(distilled, hard),
        "syn_noaug": SetJob(distilled, {**same, **NO_AUGMENT}),
        "random_noaug": SetJob(random_path, {**same, **NO_AUGMENT}),
    }
    todo = {name: job for name, job in jobs.items() if job is not None}
    for job in todo.values():
        job.log_as = "baseline/robust"
    results = evaluate_sets(cfg, ctx, list(todo.values()))
    accs = {name: students[0]["acc_mean"] for name, students in zip(todo, results, strict=True)}
    accs.setdefault("syn", done[0]["acc_mean"] if done else accs.get("syn", 0.0))
    accs.setdefault("syn_hard", accs["syn"])
    accs["real_hard"] = real_hard_accuracy(cfg, ctx, train, hard)
    scores = robust.robust_scores(accs, w=acfg.lrs_weight, gamma=acfg.ars_weight)
    return {
        "student": student if isinstance(student, str) else OmegaConf.to_container(student),
        "protocol": ev.protocol,
        "accuracies": accs,
        **scores,
    }


def real_hard_accuracy(cfg: AnyConfig, ctx: RunContext, train, hard: dict) -> float:
    """Acc(real, hard): a student trained on the whole train split with hard labels.

    `analyse.real_hard_acc` supplies a known value (e.g. a published full-data accuracy);
    otherwise the result is cached per dataset, hard protocol, student and seed, so a
    sweep over methods and IPCs trains it once per seed.
    """
    if cfg.analyse.real_hard_acc is not None:
        return float(cfg.analyse.real_hard_acc)
    ev_hard = OmegaConf.merge(cfg.evaluate, hard)
    key = {
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True),
        "evaluate": OmegaConf.to_container(ev_hard, resolve=True, enum_to_str=True),
        "seed": cfg.seed,
    }
    spec = ctx.spec

    def build(e: store.Entry) -> None:
        # The whole split as one DistilledSet; its "ipc" (largest class) picks the epochs entry.
        largest = max(len(class_indices(train, c)) for c in range(spec.num_classes))
        images = torch.stack([train[i][0] for i in range(len(train))])
        full = save_distilled(
            e / "full_train",
            images,
            train.targets,
            spec,
            {"dataset": spec.name, "method": "full_real", "ipc": largest, "seed": cfg.seed},
        )
        value = evaluate_set(cfg, ctx, SetJob(full, hard, log_as="baseline/real_hard"))[0]["acc_mean"]
        atomic_write_text(e / "acc.json", json.dumps({"acc": value}))

    # analyse runs on rank 0 alone: one process builds, any other waits (ddist/runtime/store.py)
    entry = store.entry(cfg, "real_hard_acc", key)
    return float(store.cached(entry, build, lambda e: e.read_json("acc.json", store.fields(acc=store.FRACTION))["acc"]))
