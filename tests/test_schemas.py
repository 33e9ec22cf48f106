"""The schemas of ddist/config/schema.py: a choice outside its Literal, a value of the wrong type and an
unknown key fail when the config is composed (in an override or in a config file), and the error
names the key; the CLI says so in one line."""

from __future__ import annotations

import pickle
from typing import get_args, get_type_hints

import pytest
from conftest import CONF, run_ddist
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationValidationError

from ddist.errors import ConfigError
from ddist.models import student_config


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def composition_error(*overrides: str) -> str:
    """Hydra's message and OmegaConf's (the cause, for an override) of a config that must not compose."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(*overrides)
    return f"{err.value}\n{err.value.__cause__}"


# group -> (an override with a value outside its Literal, the key it sets)
WRONG_CHOICES = {
    "config": ("precision=fp64", "precision"),
    "dataset": ("dataset.format=zip", "dataset.format"),
    "model": ("teacher.model.norm=layer", "teacher.model.norm"),
    "teacher": ("teacher.optimizer=adam", "teacher.optimizer"),
    "recover": ("recover.deda.reg_normalisation=max", "recover.deda.reg_normalisation"),
    "relabel": ("relabel.mode=cached", "relabel.mode"),
    "evaluate": ("evaluate.mix=cutout", "evaluate.mix"),
    "diffusion": ("diffusion.sample.cgs.kernel=rbf", "diffusion.sample.cgs.kernel"),
    "analyse": ("analyse.hard.schedule=step", "analyse.hard.schedule"),
    "logger": ("logger.mode=sometimes", "logger.mode"),
}

# group -> (a key its schema does not have, as dotted path, written into an experiment file)
UNKNOWN_KEYS = {
    "config": "epochs",
    "dataset": "dataset.image_size",
    "model": "teacher.model.stem",  # ConvNet has no stem (ResNets do)
    "teacher": "teacher.warmup",
    "shard": "shard.rank",
    "paths": "paths.log_dir",
    "recover": "recover.deda.lambda_cov",
    "relabel": "relabel.epochs",  # online relabelling has no epochs (stored has)
    "evaluate": "evaluate.label_smoothing",
    "diffusion": "diffusion.model.vae",  # the pixel UNet has no VAE (the latent DiT has)
    "analyse": "analyse.fid.batch_size",
    "pipeline": "pipeline.description",
    "logger": "logger.run_name",
}


@pytest.mark.parametrize("group", WRONG_CHOICES)
def test_a_value_outside_its_choices_fails_at_composition_naming_the_key(group):
    override, key = WRONG_CHOICES[group]
    message = composition_error(override)
    assert f"full_key: {key}" in message and "expected one of" in message


@pytest.mark.parametrize("group", UNKNOWN_KEYS)
def test_an_unknown_key_in_a_config_file_fails_at_composition_naming_it(group, tmp_path):
    key = UNKNOWN_KEYS[group]
    *parents, leaf = key.split(".")
    lines = [f"{'  ' * depth}{name}:" for depth, name in enumerate(parents)] + [f"{'  ' * len(parents)}{leaf}: 1"]
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\n" + "\n".join(lines) + "\n")
    message = composition_error(f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo")
    assert "In 'experiment/typo'" in message and f"full_key: {key}" in message and "not in" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [("seed=abc", "seed"), ("evaluate.lr=fast", "evaluate.lr"), ("dataset.in_memory=maybe", "dataset.in_memory")],
)
def test_a_value_of_the_wrong_type_fails_at_composition_naming_the_key(override, key):
    assert f"full_key: {key}" in composition_error(override)


def test_a_group_option_is_checked_against_its_own_schema():
    # logger=none has no mode; relabel=stored has epochs; the DiT's model has a VAE
    assert "full_key: logger.mode" in composition_error("logger=none", "logger.mode=offline")
    assert compose_cfg("relabel=stored", "relabel.epochs=3").relabel.epochs == 3
    assert compose_cfg("diffusion=dit", "diffusion.model.vae=null").diffusion.model.vae is None


def test_choices_read_back_as_their_strings_and_the_config_pickles():
    cfg = compose_cfg("pipeline=sre2l", "evaluate.mix=mixup")
    assert cfg.recover.objective == "sre2l" and f"{cfg.evaluate.mix}" == "mixup"
    assert {"mixup": 1}[cfg.evaluate.mix] == 1  # hashes as its value
    # joblib and submitit ship the config to other processes
    again = pickle.loads(pickle.dumps(cfg))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_interpolated_values_are_checked_when_read():
    cfg = compose_cfg("evaluate.temperature=${dataset.name}", "recover.iterations=${seed}")
    assert cfg.recover.iterations == 0
    with pytest.raises(InterpolationValidationError, match="evaluate.temperature"):
        _ = cfg.evaluate.temperature


def test_a_model_name_no_builder_knows_fails():
    # the teacher's at composition, a student's when the config is validated (before any work)
    assert "full_key: teacher.model.name" in composition_error("teacher.model.name=vgg11")
    with pytest.raises(ConfigError, match="not a model preset"):
        student_config("vgg11")
    with pytest.raises(ConfigError, match="widht"):
        student_config({"name": "convnet", "widht": 16})
    with pytest.raises(ConfigError, match="expected one of"):
        student_config({"name": "resnet_ap10", "stem": "tiny"})
    assert student_config({"name": "convnet", "width": 16}) == (
        "convnet",
        {"name": "convnet", "depth": 3, "width": 16, "norm": "batch"},
    )


def test_the_cli_reports_a_composition_error_in_one_line(tmp_path, cache_dir):
    proc = run_ddist("recover.init=zeros", run_dir=tmp_path / "run", cache_dir=cache_dir, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("ddist: config error: recover.init: Invalid value 'zeros'"), proc.stderr


def test_the_schemas_name_every_model_builder():
    from ddist.config import schema as config
    from ddist.models import MODEL_NAMES

    assert set(get_args(get_type_hints(config.ModelConfig)["name"])) == set(MODEL_NAMES)


def test_every_stage_module_declares_its_stage_and_the_registry_reads_it_as_imported():
    """pipeline.stages' choices are the modules of ddist/stages/, each declaring its STAGE beside its run;
    the registry reads the declarations without importing torch, and they equal the imported ones."""
    import importlib

    from ddist.runtime import stages

    modules = sorted(p.stem for p in stages.STAGES_DIR.glob("*.py") if p.stem != "__init__")
    assert list(stages.names()) == modules
    for name in modules:
        module = importlib.import_module(f"ddist.stages.{name}")
        assert stages.stage(name) == module.STAGE and callable(module.run)
    assert stages.providers("teacher") == ("squeeze",)
    assert set(stages.providers("distilled")) == {"random", "recover", "diffusion"}


def test_the_schemas_and_the_objectives_list_the_same_choices():
    """Objectives take choices as plain strings (they import no config): their tuples and the
    schema's Literals must agree."""
    from ddist.methods import deda as method
    from ddist.methods import rsm as rsm_method
    from ddist.objectives import deda, rsm

    assert get_args(method.RegNormalisation) == deda.REG_NORMALISATIONS
    assert get_args(method.GammaScope) == deda.GAMMA_SCOPES
    assert get_args(method.ClassReduction) == deda.CLASS_REDUCTIONS
    assert get_args(rsm_method.RsmReduction) == rsm.REDUCTIONS
