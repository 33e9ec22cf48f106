"""The RunContext between stages: a missing artifact names the stage that makes it."""

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg

from ddist.data import ImageDataset, dataset_spec, load_split
from ddist.errors import ConfigError
from ddist.runtime.context import RunContext
from ddist.training.teacher import load_teacher


def bare_ctx(cfg, tmp_path: Path, stage: str) -> RunContext:
    """The ctx the pipeline hands its first stage, as if that stage were `stage`."""
    return RunContext(run_dir=tmp_path, device=torch.device("cpu"), spec=dataset_spec(cfg.dataset), stage=stage)


def test_require_names_the_stage_that_makes_a_missing_artifact(tmp_path, cache_dir):
    ctx = bare_ctx(compose_cfg(cache_dir=cache_dir, run_dir=tmp_path), tmp_path, "evaluate")
    with pytest.raises(ConfigError, match=r"evaluate needs a distilled set.*diffusion, random or recover"):
        ctx.require("distilled")
    with pytest.raises(ConfigError, match=r"evaluate needs a teacher.*add squeeze"):
        ctx.require("teacher")
    ctx.distilled = tmp_path / "distilled"
    assert ctx.require("distilled") == tmp_path / "distilled"


def test_loading_the_teacher_without_squeeze_is_a_config_error_not_a_key_error(tmp_path, cache_dir):
    cfg = compose_cfg("pipeline=sre2l", cache_dir=cache_dir, run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"recover needs a teacher"):
        load_teacher(cfg, bare_ctx(cfg, tmp_path, "recover"))


def test_load_split_returns_an_image_dataset(tmp_path, cache_dir):
    ds = load_split(compose_cfg(cache_dir=cache_dir, run_dir=tmp_path).dataset, "test")
    assert isinstance(ds, ImageDataset) and ds.images is not None
    assert len(ds) == len(ds.targets) == len(ds.images)
