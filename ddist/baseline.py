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
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ddist import distributed
from ddist.context import RunContext
from ddist.data import load_split
from ddist.data.subsets import save_random_real
from ddist.metrics.robust import improvement_over_random
from ddist.students import evaluate_set, store_soft_labels


def random_baseline(cfg: DictConfig, ctx: RunContext, students: list[dict]) -> dict | None:
    """The baseline's record for results.json (None with `evaluate.baseline: none`)."""
    if cfg.evaluate.baseline == "none":
        return None
    if is_random_real(cfg):  # pipeline=random: the set is the baseline
        return {"kind": "random", "set": str(ctx.distilled), "same_as_set": True, "students": students}
    out = ctx.run_dir / "baseline"
    # the run's label protocol: soft labels stored like the set's (relabel stage), or online
    stored = out / "relabel" if ctx.relabel is not None else None

    def write_set() -> Path:  # rank 0 writes; torchrun's other ranks read
        train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
        path = save_random_real(out / "random_real", train, ctx.spec, cfg.ipc, cfg.seed)
        if stored is not None:
            store_soft_labels(cfg, ctx, path, stored)
        return path

    path = distributed.from_main(write_set)
    return {
        "kind": "random",
        "set": str(path),
        "same_as_set": False,
        "students": evaluate_set(cfg, ctx, path, stored=stored),
    }


def is_random_real(cfg: DictConfig) -> bool:
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
