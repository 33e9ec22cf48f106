"""MiniMax's fine-tuning objective (Gu et al., CVPR 2024): the denoising loss, each clean estimate pulled
towards the real latents of its class and pushed from earlier estimates of it, both kept in per-class
memories (ddist/objectives/minimax.py). Settings: diffusion.finetune.minimax (lambda_pos, lambda_neg,
memory), typed by MinimaxConfig below (its descriptor's settings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from omegaconf import MISSING

from ddist.config.schema import FinetuneConfig, as_node
from ddist.methods.base import Method, register


@dataclass
class MinimaxConfig:
    lambda_pos: float = MISSING
    lambda_neg: float = MISSING
    memory: int = MISSING


class MinimaxObjective:
    """MiniMax's loss and its class memories of real latents and generated estimates (checkpointed:
    the training loop saves what state_dict returns)."""

    def __init__(self, mcfg: MinimaxConfig, num_classes: int):
        from ddist.objectives.minimax import ClassMemory

        self.lambda_pos, self.lambda_neg = mcfg.lambda_pos, mcfg.lambda_neg
        self.real, self.gen = ClassMemory(num_classes, mcfg.memory), ClassMemory(num_classes, mcfg.memory)

    def __call__(self, eps_pred, eps, x0_hat, z0, y):
        from ddist.objectives.minimax import minimax_loss

        out = minimax_loss(eps_pred, eps, x0_hat, y, self.real, self.gen, self.lambda_pos, self.lambda_neg)
        self.real.push(z0, y)
        self.gen.push(x0_hat, y)
        return out

    def state_dict(self) -> dict[str, list]:
        return {"real": self.real.items, "gen": self.gen.items}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        self.real.items, self.gen.items = list(state["real"]), list(state["gen"])


def build(fcfg: FinetuneConfig, *, num_classes: int) -> MinimaxObjective:
    # its node: typed by MinimaxConfig, which FinetuneConfig does not declare
    return MinimaxObjective(cast(MinimaxConfig, as_node(fcfg).minimax), num_classes)


METHOD = register(Method(name="minimax", kind="finetune", build=build, settings=MinimaxConfig))
