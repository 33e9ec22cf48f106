"""Evaluate: train the configured students on the DistilledSet and test them (ddist.students).

`evaluate.distilled=PATH` evaluates an existing set instead of the one the run made.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ddist.context import RunContext
from ddist.students import evaluate_set


def run(cfg: DictConfig, ctx: RunContext) -> RunContext:
    if cfg.evaluate.distilled:
        ctx.distilled = Path(cfg.evaluate.distilled)
    students = evaluate_set(cfg, ctx, ctx.require("distilled"), stored=ctx.relabel)
    ctx.results["students"] = students
    for s in students:
        ctx.logger.log({f"evaluate/{s['name']}/{s['protocol']}/acc_mean": s["acc_mean"]})
    return ctx
