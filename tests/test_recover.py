"""The recover stage: batch plans, pixel bounds, divergence, and end to end on digits."""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TRAINED_TEACHER, compose_cfg, read_results, run_pipeline
from conftest import stage_ctx as pipeline_ctx
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ddist.config.checks import check_config, check_recover
from ddist.data import dataset_spec, load_split
from ddist.errors import ConfigError, DivergenceError
from ddist.methods import REGISTRY
from ddist.models import build_model
from ddist.runtime.artifacts import load_distilled, save_checkpoint
from ddist.runtime.context import RunContext
from ddist.stages import analyse, recover, squeeze
from ddist.training import class_stats
from ddist.training import recover as recovery

REPO = Path(__file__).resolve().parents[1]


def test_batch_groups_ipc_slice_and_whole_class():
    # image (c, i) sits at c * ipc + i
    assert [g.tolist() for g in recover.batch_groups(3, 2, "ipc_slice", None)] == [[0, 2, 4], [1, 3, 5]]
    assert [g.tolist() for g in recover.batch_groups(3, 2, "ipc_slice", 2)] == [[0, 2], [4], [1, 3], [5]]
    assert [g.tolist() for g in recover.batch_groups(3, 2, "whole_class", None)] == [[0, 1, 2, 3, 4, 5]]
    assert [g.tolist() for g in recover.batch_groups(3, 2, "whole_class", 4)] == [[0, 1, 2, 3], [4, 5]]
    assert [g.tolist() for g in recover.batch_groups(3, 2, "whole_class", 1)] == [[0, 1], [2, 3], [4, 5]]


def test_pixel_bounds_are_the_normalised_unit_interval():
    spec = dataset_spec(
        {
            "name": "t",
            "format": "digits",
            "classes": ["a"],
            "channels": 2,
            "resolution": 4,
            "mean": [0.5, 0.25],
            "std": [0.5, 0.25],
        }
    )
    low, high = recovery.pixel_bounds(spec, torch.device("cpu"))
    assert low.flatten().tolist() == [-1.0, -1.0]
    assert high.flatten().tolist() == [1.0, 3.0]


def digits_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "pipeline=deda",
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path}",
                "logger=none",
                *overrides,
            ],
        )


def stage_ctx(cfg, tmp_path: Path) -> RunContext:
    """A ctx as squeeze leaves it, with an untrained (randomly initialised) digits teacher."""
    spec = dataset_spec(cfg.dataset)
    teacher = build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution)
    save_checkpoint(tmp_path / "teacher.pt", teacher)
    return RunContext(
        run_dir=tmp_path / "run",
        device=torch.device("cpu"),
        spec=spec,
        teacher=tmp_path / "teacher.pt",
        teacher_acc=0.1,
    )


class NaNAt:
    """An objective whose loss turns NaN at one iteration."""

    def __init__(self, bad_iteration: int):
        self.bad_iteration = bad_iteration

    def __call__(self, images, labels, iteration, iterations):
        loss = images.square().mean()
        if iteration == self.bad_iteration:
            loss = loss * float("nan")
        return loss, {}

    def close(self):
        pass


def test_nan_loss_stops_the_stage_naming_the_iteration(tmp_path, monkeypatch):
    cfg = digits_cfg(tmp_path, "recover=sre2l", "ipc=1", "recover.iterations=10")
    sre2l = REGISTRY["recover"]["sre2l"]
    monkeypatch.setitem(REGISTRY["recover"], "sre2l", dataclasses.replace(sre2l, build=lambda rcfg, **_: NaNAt(3)))
    with pytest.raises(DivergenceError, match=r"recover.*iteration 3.*recover\.lr"):
        recover.run(cfg, stage_ctx(cfg, tmp_path))
    assert not (tmp_path / "run" / "distilled").exists()


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["recover.batch.mode=ipc_slice"], "recover.batch.mode=whole_class"),
        (["recover=sre2l", "recover.objective=deda"], "set recover=deda"),
        (["recover.objective=sre2l"], "set recover=sre2l"),
    ],
)
def test_recover_options_that_do_not_go_together_are_refused_up_front(overrides, fix, tmp_path):
    with pytest.raises(ConfigError, match=fix):
        check_recover(digits_cfg(tmp_path, *overrides))


@pytest.mark.parametrize("method", ["deda", "sre2l"])
def test_recover_end_to_end_on_digits(method, cache_dir, tmp_path):
    ipc = 2
    run_dir = tmp_path / "run"
    objective = "recover.deda.reg_iterations=3" if method == "deda" else "recover.bn_matching.r_bn=0.01"
    run_pipeline(
        f"pipeline={method}", f"ipc={ipc}", "recover.iterations=6", objective, run_dir=run_dir, cache_dir=cache_dir
    )

    distilled = load_distilled(run_dir / "distilled")
    assert distilled.images.shape == (10 * ipc, 1, 16, 16)
    assert distilled.labels.tolist() == [c for c in range(10) for _ in range(ipc)]
    assert distilled.meta["method"] == method and distilled.meta["ipc"] == ipc
    low, high = (0 - 0.3054) / 0.3186, (1 - 0.3054) / 0.3186  # digits mean/std
    assert torch.isfinite(distilled.images).all()
    assert distilled.images.min() >= low - 1e-5 and distilled.images.max() <= high + 1e-5
    assert distilled.images.std() > 0.1  # optimised noise, not a constant image
    assert len(list((run_dir / "distilled" / "images").rglob("*.png"))) == 10 * ipc

    results = read_results(run_dir)
    assert (results["method"], results["dataset"], results["ipc"]) == (method, "digits", ipc)
    assert "recover" in results["timings"]
    accs = [a for student in results["students"] for a in student["accs"]]
    assert accs and all(0.0 <= a <= 1.0 for a in accs)
    if method == "deda":  # the real class statistics are cached for the next run
        assert list(cache_dir.glob("class_stats/*/class_stats.safetensors"))


def deda_covariance(cache_dir: Path, run_dir: Path, *overrides: str) -> dict:
    """Squeeze (a cache hit), DEDA recover and analyse in-process on digits at IPC 10; the
    analysis's covariance figures."""
    cfg = compose_cfg(
        *TRAINED_TEACHER,
        "pipeline=deda",
        "ipc=10",
        "recover.iterations=60",
        "recover.deda.reg_iterations=30",
        "analyse.real_samples_per_class=10",
        "analyse.figures=false",
        *overrides,
        cache_dir=cache_dir,
        run_dir=run_dir,
    )
    ctx = pipeline_ctx(cfg, run_dir)
    for stage in (squeeze, recover, analyse):
        ctx = stage.run(cfg, ctx)
    return ctx.results["analysis"]["covariance"]


def test_deda_regulariser_spreads_and_conditions_the_class_covariance(trained_digits_teacher, cache_dir, tmp_path):
    with_reg = deda_covariance(cache_dir, tmp_path / "reg")
    without = deda_covariance(
        cache_dir, tmp_path / "zero", "recover.deda.lambda_diag=0", "recover.deda.lambda_offdiag=0"
    )
    assert with_reg["layer"] == without["layer"] == "stage3"  # L: the pooled last block
    syn, syn0 = with_reg["synthetic"], without["synthetic"]
    assert syn["spanned_condition_number_classes"] == syn0["spanned_condition_number_classes"] == 10
    assert syn["mean_diagonal"] > syn0["mean_diagonal"]
    assert syn["spanned_condition_number"] < syn0["spanned_condition_number"]
    assert with_reg["real_same_ipc"] == without["real_same_ipc"]  # the same real reference


@pytest.mark.parametrize("value", [0, -5])
def test_a_bad_stats_subset_names_the_option(tmp_path, value):
    cfg = digits_cfg(tmp_path, f"recover.class_stats.images_per_class={value}")
    with pytest.raises(ConfigError, match=r"recover\.class_stats\.images_per_class"):
        check_config(cfg)


def test_a_stats_subset_that_is_not_a_number_fails_at_compose(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"recover\.class_stats\.images_per_class"):
        digits_cfg(tmp_path, "recover.class_stats.images_per_class=all")


@pytest.mark.parametrize("per_class", [7, None])
def test_the_stats_pass_reads_that_many_real_images_per_class(tmp_path, monkeypatch, per_class):
    from ddist.training.teacher import load_teacher

    cfg = digits_cfg(tmp_path, f"recover.class_stats.images_per_class={'null' if per_class is None else per_class}")
    ctx = stage_ctx(cfg, tmp_path)
    seen = []

    def counted(batches):
        for x, y in batches:
            seen.append(y)
            yield x, y

    real_pass = class_stats.real_class_stats
    monkeypatch.setattr(class_stats, "real_class_stats", lambda t, b, *a, **k: real_pass(t, counted(b), *a, **k))
    class_stats.load_class_stats(cfg, ctx, load_teacher(cfg, ctx), ["stage1"])
    counts = torch.bincount(torch.cat(seen), minlength=10)
    all_counts = torch.bincount(load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir)).targets, minlength=10)
    assert counts.tolist() == (all_counts if per_class is None else torch.full((10,), per_class)).tolist()


def test_cache_keys_hold_every_declared_field_always(tmp_path):
    """The store's rule (ddist/runtime/store.py): a key holds every field of the nodes it names, at its
    default and null too; only fields declared not to change the artifact are left out, by name."""
    from ddist.training.class_stats import class_stats_key
    from ddist.training.teacher import teacher_key

    cfg = compose_cfg("pipeline=sre2l", cache_dir=tmp_path, run_dir=tmp_path)
    key = recover.recover_key(cfg)
    assert key["dataset"] == OmegaConf.to_container(cfg.dataset, resolve=True)  # crop_draw, subset: all there
    assert key["recover"]["batch"]["parallel_groups"] == 1
    teacher = teacher_key(cfg)
    assert {"subset", "val_per_class"} <= set(teacher["dataset"]) and teacher["precision"] == "fp32"
    assert {"roll_mode", "crop_draw"} <= set(teacher["dataset"]["augment"]) and "clip_grad_norm" in teacher["teacher"]
    assert not {"checkpoint", "num_workers", "log_every"} & set(teacher["teacher"])  # declared: no effect on weights
    assert class_stats_key(cfg, ["stage3"])["images_per_class"] is None
