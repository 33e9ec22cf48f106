"""Evidence beside every result: the random-real baseline and its gain, the validation split,
and settings chosen on it by an Optuna search (issue 13)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, TINY, compose_cfg, read_results, run_ddist, run_pipeline, stage_ctx
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist import pipeline, report
from ddist.data import load_split
from ddist.data.loaders import VAL_SPLIT_SEED, val_indices
from ddist.errors import ConfigError
from ddist.runtime.artifacts import load_distilled
from ddist.training.teacher import teacher_key

# a DEDA recover that takes a second on digits
QUICK_RECOVER = ["recover.iterations=4", "recover.deda.reg_iterations=2"]


def _digits(**overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "dataset" / "digits.yaml"), overrides)


# ----------------------------------------------------------------------------- the validation split


def test_val_split_is_carved_from_train_disjoint_stratified_and_fixed():
    whole = load_split(_digits(), "train")
    train, val = load_split(_digits(val_per_class=7), "train"), load_split(_digits(val_per_class=7), "val")
    # stratified: exactly 7 of each class, the rest stays in train
    assert val.targets.bincount().tolist() == [7] * 10
    assert (train.targets.bincount() + 7).tolist() == whole.targets.bincount().tolist()
    # disjoint and complete: val and train are complementary rows of the whole train split
    idx = val_indices(whole.targets, 10, 7)
    rest = torch.tensor(sorted(set(range(len(whole))) - set(idx.tolist())))
    assert torch.equal(val.images, whole.images[idx]) and torch.equal(train.images, whole.images[rest])
    assert len(set(idx.tolist()) & set(rest.tolist())) == 0 and len(idx) + len(rest) == len(whole)
    # fixed: the same draw on every load, and not simply the first images of each class
    again = load_split(_digits(val_per_class=7), "val")
    assert torch.equal(again.images, val.images) and torch.equal(again.targets, val.targets)
    first = torch.cat([torch.nonzero(whole.targets == c).flatten()[:7] for c in range(10)]).sort().values
    assert not torch.equal(idx, first) and VAL_SPLIT_SEED == 0
    # the test split is untouched
    assert torch.equal(load_split(_digits(val_per_class=7), "test").images, load_split(_digits(), "test").images)


def test_val_split_of_a_lazy_file_dataset(tmp_path):
    from test_data import _imagenet_tree

    wnids = ["n01000000", "n05000000", "n09000000"]
    _imagenet_tree(tmp_path, wnids, sorted(wnids).index)
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "dataset" / "imagenet1k.yaml"),
        {"root": str(tmp_path), "num_classes": 3, "resolution": 24, "val_per_class": 1},
    )
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    assert train.images is None and val.images is None  # still decoded per item
    assert val.targets.tolist() == [0, 1, 2] and train.targets.bincount().tolist() == [1, 1, 1]
    assert not set(val.files.paths) & set(train.files.paths)
    assert val[0][0].shape == (3, 24, 24)


def test_val_split_bad_sizes_name_the_option():
    with pytest.raises(ConfigError, match="dataset.val_per_class"):
        load_split(_digits(), "val")
    with pytest.raises(ConfigError, match="dataset.val_per_class=500 leaves class"):
        load_split(_digits(val_per_class=500), "train")
    with pytest.raises(ConfigError, match="dataset.val_per_class"):
        load_split(_digits(val_per_class=-1), "train")


def test_cache_keys_hold_val_per_class(tmp_path):
    from ddist.training.class_stats import class_stats_key

    plain = compose_cfg(cache_dir=tmp_path, run_dir=tmp_path)
    carved = compose_cfg("dataset.val_per_class=5", cache_dir=tmp_path, run_dir=tmp_path)
    assert teacher_key(plain)["dataset"]["val_per_class"] is None  # every declared field, unset too
    assert teacher_key(carved)["dataset"]["val_per_class"] == 5
    assert class_stats_key(plain, ["stage3"]) != class_stats_key(carved, ["stage3"])


def test_teacher_and_class_statistics_never_see_the_val_split(tmp_path, monkeypatch):
    from ddist.stages import squeeze
    from ddist.training import class_stats
    from ddist.training.teacher import build_teacher

    seen: dict[str, torch.Tensor] = {}
    real_batches, sorted_batches = squeeze.real_batches, class_stats.class_sorted_batches

    def record_teacher(ds, *args, **kwargs):
        seen["teacher"] = ds.images
        return real_batches(ds, *args, **kwargs)

    def record_stats(ds, *args, **kwargs):
        seen["stats"] = ds.images
        return sorted_batches(ds, *args, **kwargs)

    monkeypatch.setattr(squeeze, "real_batches", record_teacher)
    monkeypatch.setattr(class_stats, "class_sorted_batches", record_stats)
    cfg = compose_cfg(
        "dataset.val_per_class=9", "teacher.epochs=1", "teacher.model.width=8", cache_dir=tmp_path, run_dir=tmp_path
    )
    ctx = squeeze.run(cfg, stage_ctx(cfg, tmp_path))
    class_stats.load_class_stats(cfg, ctx, build_teacher(cfg, ctx.spec).eval(), ["stage3"])
    train = load_split(cfg.dataset, "train")
    for images in seen.values():
        assert torch.equal(images, train.images)  # 1437 - 90 images: the val rows are gone
    assert len(seen) == 2 and len(train) == 1437 - 90


def test_random_real_picks_exclude_the_val_split(tmp_path):
    from ddist.stages import random

    cfg = compose_cfg("pipeline=random", "ipc=35", "dataset.val_per_class=100", cache_dir=tmp_path, run_dir=tmp_path)
    ctx = random.run(cfg, stage_ctx(cfg, tmp_path))
    spec = ctx.spec
    rows = {bytes(_uint8(spec, x)) for x in load_distilled(ctx.distilled, spec).images}
    whole = load_split(_digits(), "train")
    train = load_split(cfg.dataset, "train")
    train_rows = {bytes(im.numpy()) for im in train.images}
    val_only = {bytes(whole.images[i].numpy()) for i in val_indices(whole.targets, 10, 100).tolist()} - train_rows
    # 39-82 images per class remain: 35 picks from the whole split would surely hit some of the 100 val images
    assert len(rows) > 300 and rows <= train_rows and not rows & val_only


def _uint8(spec, x: torch.Tensor):
    return (spec.denormalize(x) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def test_students_are_scored_on_the_val_split_and_cached_apart(tmp_path, monkeypatch):
    import ddist.training.cohort as cohort
    import ddist.training.students as students
    from ddist.data.subsets import save_random_real
    from ddist.stages import squeeze

    scored: list = []
    monkeypatch.setattr(
        cohort, "cohort_accuracy", lambda net, where, ds, *a, **k: scored.append(ds) or [0.5] * len(where)
    )
    common = [*TINY[1:], "evaluate.epochs=1", "dataset.val_per_class=4"]
    cfg = compose_cfg(*common, "evaluate.split=val", cache_dir=tmp_path, run_dir=tmp_path)
    ctx = squeeze.run(cfg, stage_ctx(cfg, tmp_path))
    path = save_random_real(tmp_path / "set", load_split(cfg.dataset, "train"), ctx.spec, 1, 0)
    students.evaluate_set(cfg, ctx, students.SetJob(path))
    val = load_split(cfg.dataset, "val")
    assert torch.equal(scored[-1].images, val.images) and len(scored[-1]) == 40
    # the same set scored on test trains its own student (another cache entry)
    test_cfg = compose_cfg(*common, "evaluate.split=test", cache_dir=tmp_path, run_dir=tmp_path)
    students.evaluate_set(test_cfg, ctx, students.SetJob(path))
    assert len(scored) == 2 and len(scored[-1]) == 360


def test_evaluate_split_val_without_a_val_split_is_one_clear_error(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="dataset.val_per_class"):
        run_pipeline("evaluate.split=val", run_dir=tmp_path / "run", cache_dir=cache_dir)
    assert not (tmp_path / "run" / "results.json").exists()


# ----------------------------------------------------------------------------- the random-real baseline


def test_every_run_reports_the_random_real_baseline_and_its_gain(tmp_path, cache_dir, capsys, caplog):
    run_dir = tmp_path / "deda"
    run_pipeline(*QUICK_RECOVER, "ipc=2", run_dir=run_dir, cache_dir=cache_dir)
    printed = capsys.readouterr().out
    results = read_results(run_dir)
    (student,) = results["students"]
    (base,) = results["baseline"]["students"]
    assert results["baseline"]["kind"] == "random" and not results["baseline"]["same_as_set"]
    assert base["name"] == student["name"] and base["protocol"] == student["protocol"] == "soft"
    assert student["baseline_acc_mean"] == base["acc_mean"]
    assert student["gain_pp"] == pytest.approx(100 * (student["acc_mean"] - base["acc_mean"]))
    assert student["ior"] == pytest.approx(student["acc_mean"] - base["acc_mean"])
    assert "random real" in printed and f"{student['gain_pp']:+.2f}pp" in printed

    # the baseline is the random pipeline's set at this (ipc, seed): same tensors, so its student is cached
    random_dir = tmp_path / "random"
    with caplog.at_level(logging.INFO, logger="ddist"):
        run_pipeline("pipeline=random", "ipc=2", run_dir=random_dir, cache_dir=cache_dir)
    same = (random_dir / "distilled" / "data.safetensors").read_bytes()
    assert (run_dir / "baseline" / "random_real" / "data.safetensors").read_bytes() == same
    random = read_results(random_dir)
    assert random["students"][0]["acc_mean"] == base["acc_mean"] and "finished earlier" in caplog.text
    # pipeline=random is its own baseline: nothing is trained twice, the gain is 0
    assert random["baseline"]["same_as_set"] and random["students"][0]["gain_pp"] == 0
    assert not (random_dir / "baseline").exists()


@pytest.mark.slow
def test_baseline_none_leaves_it_out(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    run_pipeline(*QUICK_RECOVER, "ipc=1", "evaluate.baseline=none", run_dir=run_dir, cache_dir=cache_dir)
    results = read_results(run_dir)
    assert results["baseline"] is None and "gain_pp" not in results["students"][0]
    (header,) = (line for line in capsys.readouterr().out.splitlines() if line.startswith("  student"))
    assert not (run_dir / "baseline").exists() and "random real" not in header and header.endswith("runs")


@pytest.mark.slow
def test_baseline_gets_the_same_stored_label_protocol(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_pipeline(*QUICK_RECOVER, "ipc=1", "relabel=stored", "relabel.top_k=3", run_dir=run_dir, cache_dir=cache_dir)
    mine = json.loads((run_dir / "relabel" / "meta.json").read_text())
    theirs = json.loads((run_dir / "baseline" / "relabel" / "meta.json").read_text())
    assert theirs["top_k"] == mine["top_k"] == 3
    assert {k: v for k, v in theirs.items() if k != "bytes"} == {k: v for k, v in mine.items() if k != "bytes"}
    # the stored-label students are keyed apart from online ones (top-k changes what they learn)
    keys = [json.loads(p.read_text()) for p in cache_dir.glob("student/*/key.json")]
    assert any(k.get("labels") == {"stored": "fp16", "top_k": 3} for k in keys)


def test_bad_baseline_is_one_clear_error(tmp_path, cache_dir):
    proc = run_ddist("evaluate.baseline=nosuch", run_dir=tmp_path / "run", cache_dir=cache_dir, check=False)
    assert proc.returncode == 2 and "evaluate.baseline" in proc.stderr


def _write_run(root: Path, name: str, method: str, acc: float, base: float | None, split: str = "test") -> None:
    job = root / name
    job.mkdir(parents=True)
    student = {"name": "convnet", "protocol": "soft", "accs": [acc], "acc_mean": acc, "acc_std": 0.0}
    if base is not None:
        student |= {"baseline_acc_mean": base, "gain_pp": 100 * (acc - base), "ior": acc - base}
    results = {"method": method, "dataset": "digits", "ipc": 10, "seed": 0, "evaluate_split": split}
    (job / "results.json").write_text(json.dumps({**results, "students": [student], "timings": {}}))


def test_report_shows_each_runs_baseline_gain_and_marks_val_runs(tmp_path):
    _write_run(tmp_path, "a", "deda", 0.80, 0.70)
    _write_run(tmp_path, "b", "deda", 0.90, 0.75, split="val")  # a search trial: not a duplicate of a
    _write_run(tmp_path, "c", "sre2l", 0.60, None)  # an older run: the random pipeline's row is its baseline
    _write_run(tmp_path, "d", "random", 0.65, None)
    rows, collected, _ = report.build_report([tmp_path], tmp_path / "out")
    assert not collected.duplicates
    by = {(r["method"], r["split"]): r for r in rows}
    assert by[("deda", "test")]["random_acc"] == pytest.approx(0.70)
    assert by[("deda", "test")]["gain_pp"] == pytest.approx(10.0)
    assert by[("deda", "test")]["ior"] == pytest.approx(0.10)
    assert by[("deda", "val")]["random_acc"] == pytest.approx(0.75)
    assert by[("sre2l", "test")]["random_acc"] == pytest.approx(0.65)
    assert by[("sre2l", "test")]["gain_pp"] == pytest.approx(-5.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| deda | 10 | convnet | soft | 1 | 80.0 ± - | 70.0 | +10.0 | 0.100 |" in md
    assert "| deda [val] | 10 |" in md and "report test accuracy only for the chosen setting" in md
    header = (tmp_path / "out" / "report.csv").read_text().splitlines()[0].split(",")
    assert {"split", "random_acc", "gain_pp", "ior"} <= set(header)


# ----------------------------------------------------------------------------- the objective and the search


def test_objective_metric_names_a_results_value(tmp_path):
    results = {"students": [{"acc_mean": 0.8, "gain_pp": 3.0, "name": "convnet"}]}
    cfg = OmegaConf.create({"objective_metric": "students.0.gain_pp"})
    assert pipeline.objective(cfg, results) == 3.0
    assert pipeline.objective(OmegaConf.create({"objective_metric": None}), results) is None
    with pytest.raises(ConfigError, match="objective_metric=students.1.acc_mean"):
        pipeline.objective(OmegaConf.create({"objective_metric": "students.1.acc_mean"}), results)
    with pytest.raises(ConfigError, match="not a number"):
        pipeline.objective(OmegaConf.create({"objective_metric": "students.0.name"}), results)


def test_search_experiment_composes_with_the_optuna_sweeper():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=search/deda_cifar10"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert set(sweeper.params) == {"recover.deda.gamma", "recover.deda.lambda_diag", "recover.deda.lambda_offdiag"}
    for key in sweeper.params:  # each searched key exists in the composed config
        assert OmegaConf.select(cfg, key) is not None
    assert cfg.evaluate.split == "val" and cfg.dataset.val_per_class > 0 and cfg.dataset.name == "cifar10"
    assert cfg.objective_metric == "students.0.acc_mean"


@pytest.mark.slow  # two distillations and four students in a sweep: ~90 s on one CPU thread
def test_a_two_trial_optuna_search_on_digits_returns_the_val_accuracy(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    run_ddist(
        "-m",
        "hydra/sweeper=optuna_tpe",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        *QUICK_RECOVER,
        "ipc=1",
        "evaluate.epochs=2",
        "dataset.val_per_class=5",
        "evaluate.split=val",
        "objective_metric=students.0.acc_mean",
        "recover.deda.gamma=interval(1.0, 100.0)",
        run_dir=tmp_path,
        cache_dir=cache_dir,
    )
    jobs = sorted(p for p in sweep.iterdir() if (p / "results.json").is_file())
    assert len(jobs) == 2
    results = [read_results(j) for j in jobs]
    gammas = [float(report.override_value(r, "recover.deda.gamma")) for r in results]
    assert len(set(gammas)) == 2 and all(1.0 <= g <= 100.0 for g in gammas)
    assert all(r["evaluate_split"] == "val" for r in results)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["students"][0]["acc_mean"] for r in results)
