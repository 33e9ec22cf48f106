"""The plain denoising objective ||eps_theta(z_t, t, y) - eps||^2 (ddist/objectives/diffusion.py): how a
pixel model is trained from scratch (diffusion.train) and a fine-tuning objective of its own
(diffusion.finetune.objective=plain)."""

from __future__ import annotations

from collections.abc import Mapping

from ddist.methods.base import Method, register


def build(fcfg: Mapping, *, num_classes: int):
    from ddist.objectives.diffusion import denoising_loss

    return lambda eps_pred, eps, x0_hat, z0, y: (denoising_loss(eps_pred, eps), {})


METHOD = register(Method(name="plain", kind="finetune", build=build))
