"""RSM's fine-tuning objective: the denoising loss + lambda * ||x0_hat||_1 (semantic sparsity of the
clean estimates, ddist/objectives/rsm.py). Settings: diffusion.finetune.rsm (lambda, reduction), typed
by RsmConfig below (its descriptor's settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from omegaconf import MISSING

from ddist.config.schema import FinetuneConfig, as_node
from ddist.methods.base import Method, register

# choices that ddist.objectives.rsm also lists as plain strings (tests/test_schemas.py checks that they agree)
RsmReduction = Literal["mean", "sum"]


@dataclass
class RsmConfig:
    lambda_: float = MISSING  # the key `lambda`
    reduction: RsmReduction = MISSING


def build(fcfg: FinetuneConfig, *, num_classes: int):
    from ddist.objectives.rsm import rsm_loss

    rsm = cast(RsmConfig, as_node(fcfg).rsm)  # its node: typed by RsmConfig, which FinetuneConfig does not declare
    # the key `lambda` (the schema's lambda_: a keyword); the schema admits only REDUCTIONS
    lam, reduction = float(getattr(rsm, "lambda")), str(rsm.reduction)
    return lambda eps_pred, eps, x0_hat, z0, y: rsm_loss(eps_pred, eps, x0_hat, lam, reduction)


METHOD = register(Method(name="rsm", kind="finetune", build=build, settings=RsmConfig))
