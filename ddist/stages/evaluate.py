"""Evaluate: train the configured students on the DistilledSet and, beside them, the same students on
the random-real baseline (ddist.training.baseline, `evaluate.baseline`), and test them all
(ddist.training.students: up to `evaluate.parallel` students at once).

`evaluate.distilled=PATH` evaluates an existing set instead of the one the run made;
`evaluate.split=val` scores on the validation split (choosing settings), else on test.
"""

from __future__ import annotations

from pathlib import Path

from ddist.config.schema import Config
from ddist.logging import info
from ddist.runtime.context import RunContext
from ddist.runtime.stages import Stage
from ddist.training.baseline import baseline_job, baseline_record, with_gains
from ddist.training.students import SetJob, evaluate_sets

STAGE = Stage(name="evaluate", needs=frozenset({"teacher", "distilled"}), shared=True)


def run(cfg: Config, ctx: RunContext) -> RunContext:
    if cfg.evaluate.distilled:
        ctx.distilled = Path(cfg.evaluate.distilled)
    base = baseline_job(cfg, ctx)  # the random-real set beside it (written now), trained together with it
    jobs = [SetJob(ctx.require("distilled"), stored=ctx.relabel), *([base] if base else [])]
    results = evaluate_sets(cfg, ctx, jobs)
    students = results[0]
    baseline = baseline_record(cfg, ctx, base, results[-1])
    students = with_gains(students, baseline)
    ctx.results["students"] = students
    ctx.results["baseline"] = baseline
    for s in students:
        key = f"evaluate/{s['name']}/{s['protocol']}"
        ctx.logger.log({f"{key}/acc_mean": s["acc_mean"]})
        if baseline is not None:
            ctx.logger.log({f"{key}/random_acc_mean": s["baseline_acc_mean"], f"{key}/gain_pp": s["gain_pp"]})
            info(f"student {s['name']} ({s['protocol']}): {s['gain_pp']:+.2f} points over random real")
    return ctx
