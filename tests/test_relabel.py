"""Stored soft labels replay exactly the batches and teacher signal of the online mode."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF, read_results, run_pipeline, tiny_teacher
from hydra import compose, initialize_config_dir

from ddist.data import dataset_spec
from ddist.data.plan import augmented_batch, plan, plan_settings, stored_batches
from ddist.errors import CheckpointError
from ddist.runtime.artifacts import load_distilled
from ddist.runtime.context import RunContext
from ddist.training.teacher import load_teacher


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("stored")
    overrides = ["pipeline=random", "ipc=3", "seed=5", "relabel=stored", "relabel.top_k=null"]
    run_pipeline(*overrides, run_dir=run_dir, cache_dir=cache_dir)
    teacher = tiny_teacher(cache_dir)
    return run_dir, teacher, overrides


def test_stored_batches_equal_the_online_plan_and_teacher_logits(stored_run):
    run_dir, teacher_path, overrides = stored_run
    cfg = compose_cfg([*overrides, "teacher.model.width=16", "evaluate.epochs=3"])
    distilled = load_distilled(run_dir / "distilled")
    ctx = RunContext(run_dir=run_dir, device=torch.device("cpu"), spec=dataset_spec(cfg.dataset), teacher=teacher_path)
    teacher = load_teacher(cfg, ctx)
    settings = plan_settings(cfg.evaluate, cfg.dataset.resolution, cfg.seed, len(distilled.labels), 3)

    online = list(plan(settings))
    stored = list(stored_batches(run_dir / "relabel", settings))
    assert len(stored) == len(online) == 3  # 30 images, batch 64: one batch per epoch
    for want, got in zip(online, stored, strict=False):
        for key, value in want.items():
            assert torch.equal(got[key], value), key
        with torch.no_grad():
            logits = teacher(augmented_batch(distilled.images, want, ctx.device))
        assert torch.allclose(got["logits"], logits, atol=1e-2, rtol=1e-3)  # fp16 storage

    meta = json.loads((run_dir / "relabel" / "meta.json").read_text())
    assert meta["bytes"] == read_results(run_dir)["relabel_bytes"] > 0


def test_stored_labels_for_other_settings_are_refused(stored_run):
    run_dir, _, overrides = stored_run
    cfg = compose_cfg(overrides)
    settings = plan_settings(cfg.evaluate, cfg.dataset.resolution, cfg.seed + 1, 30, 3)
    with pytest.raises(CheckpointError, match="relabel"):
        next(stored_batches(run_dir / "relabel", settings))


def test_stored_labels_of_another_teacher_or_with_a_missing_epoch_are_refused(stored_run, tmp_path):
    import shutil

    run_dir, teacher_path, overrides = stored_run
    cfg = compose_cfg(overrides)
    settings = plan_settings(cfg.evaluate, cfg.dataset.resolution, cfg.seed, 30, 3)
    assert len(list(stored_batches(run_dir / "relabel", settings, teacher_path))) == 3  # the right teacher
    other = tmp_path / "other.pt"
    other.write_bytes(teacher_path.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="another teacher"):
        next(stored_batches(run_dir / "relabel", settings, other))
    damaged = tmp_path / "relabel"
    shutil.copytree(run_dir / "relabel", damaged)
    (damaged / "epoch_0001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lack epoch_0001"):
        next(stored_batches(damaged, settings))


def test_top_k_storage_renormalises_over_the_kept_classes(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_pipeline("pipeline=random", "ipc=1", "relabel=stored", "relabel.top_k=3", run_dir=run_dir, cache_dir=cache_dir)
    cfg = compose_cfg(["ipc=1", "evaluate.epochs=3"])
    settings = plan_settings(cfg.evaluate, cfg.dataset.resolution, cfg.seed, 10, 3)
    batch = next(stored_batches(run_dir / "relabel", settings))
    probs = torch.softmax(batch["logits"], dim=1)
    assert ((probs > 0).sum(1) == 3).all()
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)))
