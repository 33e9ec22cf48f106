"""Every config file composes with Hydra's compose API and resolves completely."""

from __future__ import annotations

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

# group directory -> how an override selects one of its files
GROUPS = {
    "dataset": "dataset",
    "model": "model@teacher.model",
    "pipeline": "pipeline",
    "recover": "recover",
    "relabel": "relabel",
    "evaluate": "evaluate",
    "diffusion": "diffusion",
    "analyse": "analyse",
    "logger": "logger",
}


def options(group: str) -> list[str]:
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


def compose_resolved(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    # resolve everything but the hydra-runtime interpolations, which only exist inside a run
    cfg.paths.root_dir = "/repo"
    cfg.paths.output_dir = "/repo/outputs/run"
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg.pop("hydra")
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


CASES = [f"{override}={option}" for group, override in GROUPS.items() for option in options(group)]
CASES += [f"experiment={option}" for option in options("experiment")]
# the 50 experiment files are slow-tier: half the fast tier's compose time, and the slow tier's
# dry-run matrix composes and runs each of them again
MARKED = [pytest.param(c, marks=pytest.mark.slow) if c.startswith("experiment=") else c for c in CASES]


def test_the_cases_cover_every_group():
    assert {c.split("=")[0] for c in CASES} >= set(GROUPS.values()) | {"experiment"}


@pytest.mark.parametrize("override", MARKED)
def test_config_composes_and_resolves(override):
    cfg = compose_resolved([override])
    assert cfg["ipc"] >= 1 and cfg["pipeline"]["stages"]
    assert cfg["dataset"]["num_classes"] is None or cfg["dataset"]["num_classes"] >= 2


def test_defaults_are_the_documented_ones():
    cfg = compose_resolved([])
    assert cfg["dataset"]["name"] == "digits"
    assert cfg["pipeline"]["name"] == "deda"
    assert cfg["logger"]["mode"] == "offline"
    assert cfg["device"] == "auto"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("dataset.subset.per_class=500", {"classes": None, "per_class": 500}),
        ("dataset.subset={classes:2,per_class:5}", {"classes": 2, "per_class": 5}),
        ("dataset.subset=null", None),
    ],
)
def test_a_subset_is_set_from_the_command_line(override, expected):
    """Every dataset's subset is a node of nulls (the whole dataset), so one field can be overridden;
    OmegaConf 2.3 cannot merge a field into a structured node that is null."""
    assert compose_resolved(["dataset=cifar10", override])["dataset"]["subset"] == expected
