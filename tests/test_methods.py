"""Methods as plug-ins (ddist/methods/): a recover objective is its module with its descriptor, its option
file and its test. The toy objective below is all three in this file: it registers itself, writes its
option file into a search path of its own, and runs end to end with no other file touched. Then: every
option a method or the diffusion stage would refuse late is refused by validation, before squeeze."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest
import torch.nn.functional as F
from conftest import CONF, compose_cfg, read_results, run_pipeline
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, DictConfig, OmegaConf

from ddist.config import schema
from ddist.config.compat import for_omegaconf
from ddist.config.schema import RecoverConfig
from ddist.errors import ConfigError
from ddist.methods import Method, choices, diffusion_method, finetune_method, recover_method, register, unregister
from ddist.runtime.artifacts import load_distilled


def never_squeeze(monkeypatch) -> None:
    from ddist.stages import squeeze

    def fail(cfg, ctx):
        raise AssertionError("squeeze ran: an option was not checked up front")

    monkeypatch.setattr(squeeze, "run", fail)


# ----------------------------------------------------------------------------- a toy recover objective


@dataclass
class ToySettings:
    weight: float = MISSING  # weight of the class-mean term


@dataclass
class ToyRecoverConfig(RecoverConfig):  # the method's settings: recover.toy_stats
    toy_stats: ToySettings = MISSING


class ToyObjective:
    """CE + weight * sum over layers of ||mean_c(features of the batch's images of c) - mu_c||^2."""

    def __init__(self, teacher, class_stats: dict, ipc: int, weight: float, ce_weight: float):
        self.teacher, self.means, self.ipc = teacher, {k: m for k, (m, _) in class_stats.items()}, ipc
        self.weight, self.ce_weight = weight, ce_weight

    def __call__(self, images, labels, iteration, iterations):
        logits, feats = self.teacher.forward_features(images)
        ce = F.cross_entropy(logits, labels)
        classes = labels.view(-1, self.ipc)[:, 0]  # whole classes: ipc images each, in label order
        align = sum(
            ((feats[k].view(len(classes), self.ipc, -1).mean(1) - m[classes]) ** 2).sum(1).mean()
            for k, m in self.means.items()
        )
        return self.ce_weight * ce + self.weight * align, {"ce": ce.detach(), "align": align.detach()}

    def close(self) -> None:
        pass


BUILT: list[dict] = []  # what each build received


def build_toy(rcfg: DictConfig, *, teacher, class_stats: dict, ipc: int) -> ToyObjective:
    BUILT.append({"class_stats": class_stats, "ipc": ipc})
    return ToyObjective(teacher, class_stats, ipc, rcfg.toy_stats.weight, rcfg.ce_weight)


def check_toy(cfg: DictConfig) -> None:
    if cfg.recover.toy_stats.weight < 0:
        raise ConfigError("recover.toy_stats.weight must be >= 0.")


TOY = Method(
    name="toy_stats",
    kind="recover",
    build=build_toy,
    settings=ToyRecoverConfig,
    check=check_toy,
    needs=frozenset({"teacher", "class_stats", "whole_class_batches"}),
)

# its option file, as conf/recover/toy_stats.yaml would hold it
TOY_YAML = """\
defaults:
  - sre2l
  - toy_stats_schema
  - _self_
objective: toy_stats
batch:
  mode: whole_class
bn_matching: null
toy_stats:
  weight: 1.0
"""


@pytest.fixture
def toy(tmp_path):
    """The toy registered and its option file in a search path; the overrides that select it."""
    (tmp_path / "conf" / "recover").mkdir(parents=True)
    (tmp_path / "conf" / "recover" / "toy_stats.yaml").write_text(TOY_YAML)
    register(TOY)
    BUILT.clear()
    yield [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "recover=toy_stats"]
    unregister(TOY)


def test_a_toy_objective_registered_by_its_test_runs_end_to_end_on_the_real_class_statistics(toy, tmp_path, cache_dir):
    assert "toy_stats" in choices("recover")
    run_dir = tmp_path / "run"
    results = run_pipeline(
        *toy,
        "pipeline=deda",  # DEDA's pipeline, any recover method: the set is named by what made it
        "pipeline.stages=[squeeze,recover,evaluate]",
        "ipc=2",
        "recover.iterations=4",
        "recover.class_stats.layers=[stage2,stage3]",
        run_dir=run_dir,
        cache_dir=cache_dir,
    )
    (built,) = BUILT
    assert built["ipc"] == 2 and list(built["class_stats"]) == ["stage2", "stage3"]
    mean, cov = built["class_stats"]["stage3"]
    assert mean.shape == (10, 16) and cov.shape == (10, 16, 16)  # 10 classes, the width-16 teacher's stage3
    assert list(cache_dir.glob("class_stats/*/class_stats.safetensors"))  # the shared service, cached
    distilled = load_distilled(run_dir / "distilled")
    assert distilled.images.shape == (20, 1, 16, 16)
    # the method is named once: the set's meta.json and results.json say the toy's name
    assert distilled.meta["method"] == results["method"] == read_results(run_dir)["method"] == "toy_stats"
    assert results["students"] and 0.0 <= results["students"][0]["acc_mean"] <= 1.0


def test_the_toy_objective_s_own_checks_run_in_validation(toy, tmp_path, cache_dir, monkeypatch):
    never_squeeze(monkeypatch)
    with pytest.raises(ConfigError, match=r"recover\.toy_stats\.weight"):
        run_pipeline(*toy, "pipeline=deda", "recover.toy_stats.weight=-1", run_dir=tmp_path, cache_dir=cache_dir)
    # and the checks its needs imply: whole classes in a batch
    with pytest.raises(ConfigError, match=r"recover\.objective=toy_stats .*recover\.batch\.mode=whole_class"):
        run_pipeline(*toy, "pipeline=deda", "recover.batch.mode=ipc_slice", run_dir=tmp_path, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- naming


def test_a_method_no_module_registers_fails_in_validation_naming_the_option_and_the_choices(tmp_path, cache_dir):
    from ddist.pipeline import validate

    cfg = compose_cfg("recover.objective=dm", cache_dir=cache_dir, run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"recover\.objective=dm is not a recover method; choose one of deda, sre2l"):
        validate(cfg)
    cfg = compose_cfg("diffusion.finetune.objective=lora", cache_dir=cache_dir, run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"diffusion\.finetune\.objective=lora .*none or one of minimax, plain, rsm"):
        validate(cfg)
    with pytest.raises(ConfigError, match="recover.objective=dm"):
        recover_method("dm")


@pytest.mark.parametrize("pipeline", sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml")))
def test_each_diffusion_pipeline_is_named_as_the_method_that_makes_its_set(pipeline):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"pipeline={pipeline}"])
    if "diffusion" in cfg.pipeline.stages:
        assert diffusion_method(cfg.diffusion.finetune.objective, cfg.diffusion.sample.method) == pipeline
    if "recover" in cfg.pipeline.stages:
        assert recover_method(cfg.recover.objective).name == pipeline


# ----------------------------------------------------------------------------- a fine-tuning method's settings


@pytest.mark.parametrize("name", ["rsm", "minimax"])
def test_a_finetune_methods_settings_node_is_typed_by_its_descriptors_schema(name, tmp_path, cache_dir):
    """diffusion.finetune.<name> is typed by the schema its method's module declares (the descriptor's
    `settings`), which ddist/config/schema.py neither declares nor imports."""
    settings = finetune_method(name).settings
    assert settings is not None and settings.__module__ == f"ddist.methods.{name}"
    assert not hasattr(schema, settings.__name__)
    assert name not in {f.name for f in dataclasses.fields(schema.FinetuneConfig)}
    cfg = compose_cfg(f"pipeline={name}", cache_dir=cache_dir, run_dir=tmp_path)
    node = cfg.diffusion.finetune[name]
    assert OmegaConf.get_type(node) is for_omegaconf(settings)
    assert list(node) == [f.name.removesuffix("_") for f in dataclasses.fields(settings)]  # rsm's lambda_: lambda


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "diffusion.finetune.rsm.lamda=1",
            r"Key 'lamda' not in 'RsmConfig'\s+full_key: diffusion\.finetune\.rsm\.lamda",
        ),
        (
            "diffusion.finetune.rsm.reduction=median",
            r"'median', expected one of \[mean, sum\]\s+full_key: diffusion\.finetune\.rsm\.reduction",
        ),
        ("diffusion.finetune.minimax.memory=lots", r"'lots'.*Integer\s+full_key: diffusion\.finetune\.minimax\.memory"),
    ],
)
def test_a_finetune_methods_schema_refuses_an_unknown_key_or_a_bad_value_at_composition(override, message, tmp_path):
    with pytest.raises(ConfigCompositionException) as failed:
        compose_cfg("pipeline=rsm", override, cache_dir=tmp_path / "cache", run_dir=tmp_path)
    assert failed.value.__cause__ is not None
    assert re.search(message, str(failed.value.__cause__)), str(failed.value.__cause__)


def test_a_finetune_method_without_its_settings_fails_in_validation_naming_them(tmp_path, cache_dir):
    from ddist.pipeline import validate

    cfg = compose_cfg("pipeline=minimax", cache_dir=cache_dir, run_dir=tmp_path)
    cfg.diffusion.finetune.minimax = MISSING  # an option file that does not set them
    with pytest.raises(ConfigError, match=r"objective=minimax needs its settings diffusion\.finetune\.minimax"):
        validate(cfg)


# ----------------------------------------------------------------------------- late checks, now up front


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # the pixel UNet on digits has 1 channel (this failed after the teacher and the denoiser trained)
        (["pipeline=diffusion", "diffusion.sample.guidance_channels=5"], r"guidance_channels .*\[1, 1\].*got 5"),
        (["pipeline=diffusion", "diffusion.sample.guidance_channels=0"], r"diffusion\.sample\.guidance_channels"),
        # no stage before diffusion makes the teacher its kernel reads
        (
            ["pipeline=cgs", "pipeline.stages=[diffusion,squeeze,evaluate]", "diffusion.sample.cgs.kernel=teacher"],
            r"diffusion\.sample\.cgs\.kernel=teacher needs the teacher",
        ),
        (["pipeline=rsm", "diffusion.finetune.ema=1.0"], r"diffusion\.finetune\.ema must be a decay in \(0, 1\)"),
        (["pipeline=diffusion", "diffusion.train.ema=-0.5"], r"diffusion\.train\.ema must be a decay in \(0, 1\)"),
        # a layer the teacher (ConvNet-3: stage1-3, penultimate) lacks
        (["pipeline=deda", "recover.class_stats.layers=[stage4]"], r"recover\.class_stats\.layers=\['stage4'\]"),
        (["pipeline=deda", "recover.class_stats.layers=[]"], r"recover\.class_stats\.layers"),
    ],
)
def test_options_that_failed_late_fail_before_squeeze(overrides, message, tmp_path, cache_dir, monkeypatch):
    never_squeeze(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(*overrides, run_dir=tmp_path / "run", cache_dir=cache_dir)
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_layer_of_a_resnet_teacher_is_checked_without_its_weights(tmp_path, cache_dir):
    """The layers are checked against the architecture (built on the meta device), never a download."""
    from ddist.pipeline import validate

    base = ["pipeline=deda", "model@teacher.model=resnet18", "teacher.model.pretrained=true"]
    validate(compose_cfg(*base, "recover.class_stats.layers=[stage4]", cache_dir=cache_dir, run_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"stage5"):
        validate(compose_cfg(*base, "recover.class_stats.layers=[stage5]", cache_dir=cache_dir, run_dir=tmp_path))


def test_a_finetune_methods_check_and_dry_run_cut_are_run(monkeypatch, tmp_path):
    """Validation runs a fine-tuning method's own check, and a dry run its own cut, as for recover methods."""
    import dataclasses

    from ddist.config.checks import check_diffusion
    from ddist.methods import base

    seen: list[str] = []
    rsm = base.lookup("finetune", "rsm")

    def check(cfg):
        seen.append("check")
        raise ConfigError("diffusion.finetune.rsm: refused by the method's own check")

    def dry_run(cfg):
        seen.append("dry_run")
        cfg.diffusion.finetune.steps = 7

    monkeypatch.setitem(base.REGISTRY["finetune"], "rsm", dataclasses.replace(rsm, check=check, dry_run=dry_run))
    cfg = compose_cfg("pipeline=rsm_cgs", cache_dir=tmp_path, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="method's own check"):
        check_diffusion(cfg)
    assert seen == ["check"]
    from ddist.config.dry_run import prepare

    cut = prepare(compose_cfg("pipeline=rsm_cgs", "dry_run=true", cache_dir=tmp_path, run_dir=tmp_path))
    assert seen == ["check", "dry_run"] and cut.diffusion.finetune.steps == 7
