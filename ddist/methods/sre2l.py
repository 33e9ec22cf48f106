"""SRe2L's recover objective (Yin et al., NeurIPS 2023): CE + BatchNorm statistic matching against the
teacher's running statistics (ddist/objectives/bn_matching.py). Settings: recover.bn_matching
(conf/recover/sre2l.yaml, whose loop keys every recover option file shares)."""

from __future__ import annotations

from omegaconf import DictConfig

from ddist.errors import ConfigError
from ddist.methods.base import Method, register, warn_large_weights


def build(rcfg: DictConfig, *, teacher):
    from ddist.objectives import SRe2LObjective

    objective = SRe2LObjective(teacher, ce_weight=rcfg.ce_weight, **rcfg.bn_matching)
    # validation refused a teacher without BatchNorm before any work (check_recover: bn_hooks)
    assert objective.num_bn_layers > 0, "recover.objective=sre2l: the teacher has no BatchNorm2d layer"
    return objective


def check(cfg: DictConfig) -> None:
    if cfg.recover.bn_matching is None:
        raise ConfigError(
            "recover.objective=sre2l needs recover.bn_matching (null in recover=deda): set recover=sre2l."
        )
    warn_large_weights(cfg, ("recover.bn_matching.r_bn",))


METHOD = register(
    Method(
        name="sre2l",
        kind="recover",
        build=build,
        check=check,
        needs=frozenset({"teacher", "bn_hooks"}),
        stacks=True,  # SRe2LObjective.per_group: the BN statistics and CE of each stacked group
    )
)
