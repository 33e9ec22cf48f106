"""RSM's fine-tuning objective: the denoising loss + lambda * ||x0_hat||_1 (semantic sparsity of the
clean estimates, ddist/objectives/rsm.py). Settings: diffusion.finetune.rsm (lambda, reduction)."""

from __future__ import annotations

from ddist.config.schema import FinetuneConfig
from ddist.methods.base import Method, register


def build(fcfg: FinetuneConfig, *, num_classes: int):
    from ddist.objectives.rsm import rsm_loss

    # the key `lambda` (the schema's lambda_: a keyword); the schema admits only REDUCTIONS
    lam, reduction = float(getattr(fcfg.rsm, "lambda")), str(fcfg.rsm.reduction)
    return lambda eps_pred, eps, x0_hat, z0, y: rsm_loss(eps_pred, eps, x0_hat, lam, reduction)


METHOD = register(Method(name="rsm", kind="finetune", build=build))
