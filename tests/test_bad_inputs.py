"""The catalogue of bad inputs: each is refused up front with a ConfigError that names the option
to change (the entry point turns it into one paragraph and exit code 2, see test_pipeline), or
run with a loud warning when it is legal but can hardly be meant."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ddist.errors import ConfigError
from ddist.pipeline import validate


def composed(overrides: list[str], tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg.paths.root_dir = str(tmp_path)  # the hydra-runtime interpolations exist only inside a run
    cfg.paths.output_dir = str(tmp_path / "run")
    if "paths.cache_dir" not in " ".join(overrides):
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


# (overrides, the option the message must name): refused by validate
ERRORS = [
    (["device=banana"], "device"),
    (["seed=12345678901234567890"], r"seed must be an integer in \[0, 2\*\*63 - 1\]"),  # torch: Overflow
    (["seed=-1"], r"seed must be an integer in \[0"),  # numpy's SeedSequence: ValueError
    (["ipc=0"], "ipc"),
    (["threads=0"], "threads"),
    (["checkpoint_interval=-1"], "checkpoint_interval"),
    (["evaluate.batch_size=0"], "evaluate.batch_size"),
    (["evaluate.epochs=0"], "evaluate.epochs"),
    (["evaluate.repeats=0"], "evaluate.repeats"),
    (["evaluate.temperature=0"], "evaluate.temperature"),
    (["evaluate.lr=-1"], "evaluate.lr"),
    (["dataset.resolution=0"], "dataset.resolution"),
    (["teacher.epochs=-1"], "teacher.epochs"),
    (["teacher.lr=0"], "teacher.lr"),
    (["recover.iterations=0"], "recover.iterations"),
    (["pipeline=rsm_cgs", "diffusion.sample.steps=0"], "diffusion.sample.steps"),
    (["pipeline=cgs", "diffusion.sample.cgs.start=-0.1"], "diffusion.sample.cgs.start"),
    (["pipeline=cgs", "diffusion.sample.cgs.end=1.5"], "diffusion.sample.cgs.end"),
    (["pipeline=cgs", "diffusion.sample.cgs.start=0.6", "diffusion.sample.cgs.end=0.4"], "cgs.start=0.6 must be below"),
    (["pipeline=cgs", "diffusion.sample.cgs.max_step=0"], "diffusion.sample.cgs.max_step"),
    (["pipeline.stages=[evaluate]"], "evaluate.distilled"),
    (["pipeline.stages=[random,evaluate]"], "squeeze"),
    (
        ["pipeline.stages=[squeeze,nosuchstage]"],
        r"pipeline.stages\[1\]='nosuchstage' is not a stage; choose one of analyse",
    ),
    (["ipc=100000000"], "Lower ipc"),
    (["pipeline=random", "ipc=200"], "the smallest class"),
    (["recover.init=real", "ipc=200"], "Set ipc <="),
    # SRe2L matches BatchNorm statistics: a teacher without BatchNorm is refused before squeeze trains it
    (["pipeline=sre2l", "teacher.model.norm=instance"], "teacher.model.norm=instance gives it no BatchNorm"),
    (["pipeline=sre2l", "model@teacher.model=resnet_ap10"], "teacher.model.norm=instance gives it no BatchNorm"),
    # issue 23: settings that ran silently
    (["evaluate.students=[]"], "evaluate.students is empty"),
    (["teacher.epochs=0"], "teacher.epochs=0 keeps the teacher's initial weights"),
    (["shard.index=2", "shard.count=2"], "shard.index=2 must be below shard.count=2"),
    (["pipeline=random", "shard.count=2"], "shard.count=2 splits the parts of recover or diffusion"),
]


@pytest.mark.parametrize(("overrides", "option"), ERRORS, ids=[" ".join(o) for o, _ in ERRORS])
def test_bad_input_is_refused_naming_the_option(overrides, option, tmp_path):
    cfg = composed(overrides, tmp_path)
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        validate(cfg)


def test_device_mps_without_the_backend_is_refused(monkeypatch, tmp_path):
    from ddist.config import checks

    monkeypatch.setattr(checks, "_mps_available", lambda: False)  # as on any torch off Apple silicon
    with pytest.raises(ConfigError, match="device=mps but this torch has no usable MPS backend.*device=cpu"):
        validate(composed(["device=mps"], tmp_path))


# refused when the config is composed, by the schemas of ddist/config/schema.py (more in test_schemas)
COMPOSE_ERRORS = [
    (["seed=abc"], "seed"),
    (["ipc=ten"], "ipc"),
    (["recover.init=zeros"], "recover.init"),
    (["pipeline=cgs", "diffusion.sample.cgs.step_norm=unit"], "diffusion.sample.cgs.step_norm"),
]


@pytest.mark.parametrize(("overrides", "option"), COMPOSE_ERRORS, ids=[" ".join(o) for o, _ in COMPOSE_ERRORS])
def test_bad_value_fails_when_composed_naming_the_option(overrides, option, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        composed(overrides, tmp_path)
    assert f"full_key: {option}" in str(err.value.__cause__)


def test_a_mistyped_experiment_fails_naming_the_experiment_files(tmp_path, cache_dir):
    """`experiment: null` is not optional in conf/config.yaml: a name with no file is refused, not ignored."""
    from conftest import run_ddist
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        composed(["experiment=deda/cifar10_ipc1"], tmp_path)
    proc = run_ddist("experiment=deda/cifar10_ipc1", run_dir=tmp_path / "run", cache_dir=cache_dir, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("ddist: error:")]
    assert "experiment=deda/cifar10_ipc1" in line and "Did you mean deda/cifar10_ipc10" in line
    assert "sre2l/digits_ipc10" in line  # the list of the experiment files
    assert not (tmp_path / "run").exists()  # nothing ran


def test_an_untrained_teacher_is_fine_with_weights_to_keep(tmp_path):
    """teacher.epochs=0 is meant with a teacher.checkpoint or pretrained weights."""
    validate(composed(["teacher.epochs=0", f"teacher.checkpoint={tmp_path / 'teacher.pt'}"], tmp_path))
    validate(composed(["teacher.epochs=0", "model@teacher.model=resnet18", "teacher.model.pretrained=true"], tmp_path))


def test_a_dry_run_checks_what_it_replaces(tmp_path, caplog):
    """A dry run refuses the paths.cache_dir and shard options the real run refuses, and runs every stage
    of a shard job (it would otherwise stop after recover and still succeed)."""
    from ddist.config import dry_run

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"paths\.cache_dir.*is a file"):
        dry_run.prepare(composed(["dry_run=true", f"paths.cache_dir={blocker}/cache"], tmp_path))
    with pytest.raises(ConfigError, match=r"shard\.index=3 must be below"):
        dry_run.prepare(composed(["dry_run=true", "shard.index=3", "shard.count=2"], tmp_path))
    with pytest.raises(ConfigError, match=r"teacher\.epochs=0"):
        dry_run.prepare(composed(["dry_run=true", "teacher.epochs=0"], tmp_path))
    with caplog.at_level(logging.WARNING, logger="ddist"):
        cut = dry_run.prepare(composed(["dry_run=true", "shard.index=1", "shard.count=2"], tmp_path))
    assert (cut.shard.index, cut.shard.count) == (0, 1)
    assert any("shard.index=1 shard.count=2" in r.getMessage() for r in caplog.records)
    validate(cut)


def test_a_cache_dir_that_is_a_file_or_read_only(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="paths.cache_dir.*is a file"):
        validate(composed([f"paths.cache_dir={blocker}/cache"], tmp_path))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root may write anywhere
        with pytest.raises(ConfigError, match="paths.cache_dir.*not writable"):
            validate(composed([f"paths.cache_dir={locked}/cache"], tmp_path))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["recover.deda.gamma=1e30"], "recover.deda.gamma"),
        (["dataset.num_classes=1", "dataset.classes=[a]"], "num_classes is 1"),
        (["pipeline=deda", "ipc=1"], "DEDA with IPC = 1"),
    ],
)
def test_legal_but_unlikely_settings_warn(overrides, needle, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ddist"):
        validate(composed(overrides, tmp_path))
    assert any(needle in r.getMessage() for r in caplog.records)


def test_the_defaults_pass(tmp_path):
    validate(composed([], tmp_path))
    assert OmegaConf.select(composed([], tmp_path), "ipc") == 10


def test_a_run_directory_under_a_file_is_a_clear_error(tmp_path, cache_dir):
    from conftest import run_ddist

    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    proc = run_ddist("pipeline=random", run_dir=blocker / "run", cache_dir=cache_dir, check=False)
    assert proc.returncode == 2 and "hydra.run.dir" in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text() == "keep me"


def test_a_recover_that_does_not_optimise_warns(caplog):
    import torch

    from ddist.training.recover import warn_if_stuck

    bounds = (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    fine = torch.full((4, 1, 8, 8), 0.5)
    with caplog.at_level(logging.WARNING, logger="ddist"):
        assert warn_if_stuck([5.0 - 0.1 * i for i in range(20)], fine, bounds) == []
        stuck = warn_if_stuck([5.0 + 0.01 * i for i in range(20)], fine, bounds)
        clamped = warn_if_stuck([5.0 - 0.1 * i for i in range(20)], torch.ones(4, 1, 8, 8), bounds)
    assert len(stuck) == 1 and "did not decrease" in stuck[0]
    assert len(clamped) == 1 and "100% of the pixels" in clamped[0]
    assert sum("recover.lr" in r.getMessage() for r in caplog.records) == 2
