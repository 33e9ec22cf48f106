"""Evaluate: train the configured students on the DistilledSet and test them (ddist.students).

`evaluate.distilled=PATH` evaluates an existing set instead of the one the run made.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ddist.students import evaluate_set


def run(cfg: DictConfig, ctx: dict) -> dict:
    if cfg.evaluate.distilled:
        ctx["distilled"] = Path(cfg.evaluate.distilled)
    students = evaluate_set(cfg, ctx, ctx["distilled"], stored=ctx.get("relabel"))
    ctx["results"]["students"] = students
    for s in students:
        ctx["logger"].log({f"evaluate/{s['name']}/{s['protocol']}/acc_mean": s["acc_mean"]})
    return ctx
