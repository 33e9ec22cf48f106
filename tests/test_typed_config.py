"""Typed config at the stage boundary: a stage's `cfg` is the schema's type to mypy (ddist/config/schema.py),
so a read of a key the schema lacks fails type checking; at run time it is the DictConfig validated against
the schema, which OmegaConf.to_object also turns into objects of the schema's (rebuilt) classes."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import mypy.api
from conftest import compose_cfg
from omegaconf import OmegaConf

from ddist.config import schema

# every stage reads these through its typed cfg; the second line is a read the schema has no key for
SNIPPET = """
from ddist.config.schema import Config, DiffusionConfig


def reads(cfg: Config, dcfg: DiffusionConfig) -> object:
    ok: tuple[int, str, float] = (cfg.recover.iterations, cfg.recover.schedule, dcfg.sample.cgs.eta_dpp)
    return ok, cfg.recover.no_such_field, dcfg.sample.no_such_field
"""


def test_mypy_checks_a_typed_config_read(tmp_path):
    """What CI's mypy sees in a stage: a known read passes, an unknown one is an error naming the schema.
    Only the schema module is checked with the snippet (its imports skipped), so this takes seconds."""
    snippet, ini = tmp_path / "snippet.py", tmp_path / "mypy.ini"
    snippet.write_text(SNIPPET)
    ini.write_text("[mypy]\n")
    args = [str(snippet), schema.__file__, "--follow-imports=skip", "--config-file", str(ini)]
    out, err, status = mypy.api.run([*args, "--cache-dir", str(tmp_path / "cache")])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out + err
    assert len(errors) == 2, out
    assert '"RecoverConfig" has no attribute "no_such_field"' in errors[0]
    assert '"SampleConfig" has no attribute "no_such_field"' in errors[1]


def test_to_object_turns_the_composed_config_into_schema_objects(tmp_path):
    """The rebuilt schema classes take their fields as keywords, so OmegaConf.to_object works; each Literal
    field is a StrEnum member equal to its string, and rsm's `lambda` also answers as `lambda_`."""
    cfg = compose_cfg("paths.root_dir=/root", cache_dir=tmp_path / "cache", run_dir=tmp_path / "run")
    obj = OmegaConf.to_object(cfg)
    assert type(obj).__name__ == "Config" and dataclasses.is_dataclass(obj)
    assert type(obj.diffusion).__name__ == type(OmegaConf.to_object(cfg.diffusion)).__name__ == "PixelDiffusionConfig"
    for node, value in [
        (obj.precision, cfg.precision),
        (obj.recover.schedule, cfg.recover.schedule),
        (obj.dataset.format, cfg.dataset.format),
        (obj.diffusion.sample.method, cfg.diffusion.sample.method),
        (obj.diffusion.schedule.beta_schedule, cfg.diffusion.schedule.beta_schedule),
    ]:
        assert node == str(value) and isinstance(node, str)
    rsm = obj.diffusion.finetune.rsm
    assert rsm.lambda_ == getattr(rsm, "lambda") == cfg.diffusion.finetune.rsm["lambda"]
    assert obj.recover.iterations == cfg.recover.iterations and obj.paths.cache_dir == str(tmp_path / "cache")
    assert pickle.loads(pickle.dumps(obj)).recover.schedule == obj.recover.schedule  # shipped to other processes


def test_as_node_is_the_config_itself(tmp_path):
    cfg = compose_cfg(cache_dir=tmp_path / "cache", run_dir=tmp_path / "run")
    assert schema.as_node(cfg.teacher) is cfg.teacher
    assert OmegaConf.get_type(cfg.dataset).__name__ == "DatasetConfig"  # a typed node, read as schema.DatasetConfig
    assert Path(cfg.paths.cache_dir) == tmp_path / "cache"
