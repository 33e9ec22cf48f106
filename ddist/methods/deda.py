"""DEDA's recover objective (Li et al., ICCV 2025): CE + per-class Gaussian alignment of the teacher's
pooled features to the real class statistics + a covariance regulariser on the last of them
(ddist/objectives/deda.py). Settings: recover.deda (conf/recover/deda.yaml); the real class
statistics it aligns to come from the shared service (recover.class_stats)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from omegaconf import MISSING, DictConfig

from ddist.config.schema import RecoverConfig
from ddist.methods.base import Method, register, warn_large_weights

# choices that ddist.objectives.deda also lists as plain strings (tests/test_schemas.py checks that they agree)
RegNormalisation = Literal["mean_sum", "mean_mean", "sum_sum", "mean_rel", "sum_rel", "ratio_corr"]
GammaScope = Literal["cov", "mean_and_cov"]
ClassReduction = Literal["mean", "sum"]


@dataclass
class DedaConfig:
    mean_weight: float = MISSING
    gamma: float = MISSING
    gamma_scope: GammaScope = MISSING
    lambda_diag: float = MISSING
    lambda_offdiag: float = MISSING
    reg_normalisation: RegNormalisation = MISSING
    reg_iterations: int = MISSING
    class_reduction: ClassReduction = MISSING


@dataclass
class DedaRecoverConfig(RecoverConfig):
    deda: DedaConfig = MISSING


def build(rcfg: DictConfig, *, teacher, class_stats: dict, ipc: int):
    from ddist.objectives.deda import DEDAObjective

    return DEDAObjective(teacher, class_stats, ipc, weights(rcfg))


def weights(rcfg: DictConfig):
    """recover.deda.* and recover.ce_weight as the objective's DEDAWeights."""
    from ddist.objectives.deda import DEDAWeights

    d = rcfg.deda
    return DEDAWeights(
        mean_weight=d.mean_weight,
        gamma=d.gamma,
        gamma_scope=d.gamma_scope,
        lambda_diag=d.lambda_diag,
        lambda_offdiag=d.lambda_offdiag,
        reg_iterations=d.reg_iterations,
        reg_normalisation=d.reg_normalisation,
        class_reduction=d.class_reduction,
        ce_weight=rcfg.ce_weight,
    )


def check(cfg: DictConfig) -> None:
    warn_large_weights(
        cfg, tuple(f"recover.deda.{k}" for k in ("mean_weight", "gamma", "lambda_diag", "lambda_offdiag"))
    )
    if cfg.ipc == 1:
        from ddist.logging import warn  # imports torch: not at import of ddist

        warn(
            "DEDA with IPC = 1: a single image per class has no covariance, so the covariance "
            "alignment and the diversity regulariser are skipped (mean alignment and CE remain)."
        )


def dry_run(cfg: DictConfig) -> None:
    cfg.recover.deda.reg_iterations = 1


METHOD = register(
    Method(
        name="deda",
        kind="recover",
        build=build,
        settings=DedaRecoverConfig,
        check=check,
        dry_run=dry_run,
        # no BN hooks: the teacher comes with BatchNorm folded away (teacher.fold_bn)
        needs=frozenset({"teacher", "class_stats", "whole_class_batches"}),
    )
)
