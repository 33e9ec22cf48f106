"""Units of the core: atomic artifacts, the DistilledSet, augmentation replay, protocol losses, epochs by IPC."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ddist.data import dataset_spec
from ddist.data.augment import (
    apply,
    apply_mix,
    batch_plan,
    mix_targets,
    sample_mix,
    sample_params,
)
from ddist.errors import CacheError, CheckpointError, ConfigError, WriteError
from ddist.objectives.distill import hard_label_loss, soft_label_loss
from ddist.runtime import store
from ddist.runtime.artifacts import (
    atomic_path,
    atomic_write_text,
    load_checkpoint,
    load_distilled,
    save_checkpoint,
    save_distilled,
)
from ddist.runtime.store import config_hash
from ddist.training.loop import epochs_for

DIGITS = OmegaConf.load("conf/dataset/digits.yaml")


# ----------------------------------------------------------------------------- artifacts


def test_config_hash_is_stable_and_sensitive():
    a = {"teacher": {"lr": 0.01, "epochs": 30}, "dataset": "digits"}
    b = {"dataset": "digits", "teacher": {"epochs": 30, "lr": 0.01}}
    assert config_hash(a) == config_hash(b) == config_hash(OmegaConf.create(a))
    assert config_hash(a) != config_hash({**a, "teacher": {"lr": 0.02, "epochs": 30}})
    # an epochs table mixes int and str keys (hard_epochs): hashed as JSON writes it, not a TypeError
    table = {"epochs": {10: 1000, "max": 300}}
    assert config_hash(table) == config_hash({"epochs": {"10": 1000, "max": 300}}) != config_hash(a)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_distilled_set_round_trip(tmp_path):
    spec = dataset_spec(DIGITS)
    images = spec.normalize(torch.rand(6, 1, 16, 16))
    labels = torch.tensor([0, 0, 3, 3, 9, 9])
    path = save_distilled(tmp_path / "set", images, labels, spec, {"method": "test", "ipc": 2, "dataset": "digits"})
    loaded = load_distilled(path)
    assert torch.equal(loaded.images, images) and torch.equal(loaded.labels, labels)
    assert loaded.ipc == 2 and loaded.meta["classes"][3] == "3"
    # ImageFolder order of the class folders is the label order
    folders = sorted(p.name for p in (path / "images").iterdir())
    assert folders == ["0000_0", "0003_3", "0009_9"]


def test_corrupt_distilled_set_and_checkpoint_raise_clear_errors(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "meta.json").write_text("{}")
    (tmp_path / "set" / "data.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="Cannot read"):
        load_distilled(tmp_path / "set")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="teacher.checkpoint"):
        load_checkpoint(bad, "teacher.checkpoint")
    good = tmp_path / "good.pt"
    save_checkpoint(good, torch.nn.Linear(2, 3), {"test_acc": 0.5})
    assert load_checkpoint(good, "x")["extra"]["test_acc"] == 0.5


# ----------------------------------------------------------------------------- the artifact store


def _json_entry(root, value, calls):
    """store.cached of a tiny JSON entry: build writes value.json (counting builds), read checks it."""

    def build(e):
        calls.append(1)
        atomic_write_text(e / "value.json", json.dumps(value))

    e = store.entry(root, "thing", {"a": 1})
    return store.cached(e, build, lambda e: e.read_json("value.json", store.fields(acc=store.FRACTION))["acc"]), e


def test_a_store_entry_records_its_key_and_is_read_only_once_complete(tmp_path):
    calls = []
    assert _json_entry(tmp_path, {"acc": 0.5}, calls)[0] == 0.5
    value, e = _json_entry(tmp_path, {"acc": 0.5}, calls)
    assert value == 0.5 and calls == [1]  # the second look-up reads the entry
    assert json.loads((e / "key.json").read_text()) == {"a": 1}
    assert json.loads((e / "done.json").read_text())["files"] == {"value.json": (e / "value.json").stat().st_size}
    for name in ("value.json", "key.json", "done.json"):
        assert not (e / name).stat().st_mode & 0o222, name  # a-w: an ordinary user cannot change it in place


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ('{"acc": 2.5}', "has a value.json that has acc=2.5, not a fraction in [0, 1]"),
        ('{"acc": 0.', "has an unreadable value.json"),  # truncated, same size as recorded below
        ("[]", "has a value.json that is not a JSON object"),
    ],
)
def test_a_damaged_entry_is_rebuilt_with_a_warning_or_refused_in_a_read_only_cache(
    tmp_path, monkeypatch, caplog, written, problem
):
    calls = []
    _, e = _json_entry(tmp_path, {"acc": 0.5}, calls)
    path = e / "value.json"
    path.chmod(0o644)
    path.write_text(written)
    done = json.loads((e / "done.json").read_text())
    done["files"]["value.json"] = path.stat().st_size  # the size check passes: the content check must catch it
    (e / "done.json").chmod(0o644)
    (e / "done.json").write_text(json.dumps(done))
    # a cache this user cannot write (root writes anyway: the store's decision is what is tested)
    monkeypatch.setattr(store, "_may_write", lambda path: False)
    with pytest.raises(CacheError) as err:
        _json_entry(tmp_path, {"acc": 0.5}, calls)
    assert f"The cached thing at {e.path} {problem}" in str(err.value) and "is read-only" in str(err.value)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="ddist"):
        assert _json_entry(tmp_path, {"acc": 0.5}, calls)[0] == 0.5
    assert f"The cached thing at {e.path} {problem}" in caplog.text and "building it again" in caplog.text
    assert calls == [1, 1]


def test_a_truncated_file_of_an_entry_is_found_by_its_recorded_size(tmp_path, caplog):
    calls = []
    _, e = _json_entry(tmp_path, {"acc": 0.5}, calls)
    (e / "value.json").chmod(0o644)
    (e / "value.json").write_text('{"acc"')
    with caplog.at_level(logging.WARNING, logger="ddist"):
        assert _json_entry(tmp_path, {"acc": 0.5}, calls)[0] == 0.5
    assert "has value.json of 6 bytes, not the 12 it was written with" in caplog.text and calls == [1, 1]


def test_a_read_only_cache_serves_its_entries_and_names_the_one_it_cannot_build(tmp_path, monkeypatch):
    from conftest import compose_cfg

    from ddist.config.checks import check_cache_dir

    calls = []
    _json_entry(tmp_path / "cache", {"acc": 0.5}, calls)
    monkeypatch.setattr(store, "_may_write", lambda path: False)
    with monkeypatch.context() as patch:  # read-only for this user (root writes anyway: the decision is tested)
        patch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)
        check_cache_dir(tmp_path / "cache")  # an existing read-only cache passes the up-front check ...
        with pytest.raises(ConfigError, match="paths.cache_dir.*not writable"):
            check_cache_dir(tmp_path / "absent")  # ... one that cannot even be made does not
    assert _json_entry(tmp_path / "cache", {"acc": 0.5}, calls)[0] == 0.5 and calls == [1]  # served, nothing written
    cfg = compose_cfg(cache_dir=tmp_path / "cache", run_dir=tmp_path)
    e = store.entry(cfg, "thing", {"a": 2})
    with pytest.raises(CacheError, match=rf"thing cache entry {e.path} must be built, but paths.cache_dir="):
        store.cached(e, lambda e: None, lambda e: None)
    assert not e.path.exists()


def test_class_statistics_two_runs_need_at_once_are_computed_once(tmp_path, monkeypatch):
    """Class statistics took no lock before the store: two runs needing them at once computed them twice."""
    import threading
    import time

    from conftest import compose_cfg, stage_ctx

    from ddist.training import class_stats

    cfg = compose_cfg("pipeline=deda", cache_dir=tmp_path / "cache", run_dir=tmp_path)
    computed = []

    def slow_stats(teacher, batches, num_classes, layers, device, total=None):
        computed.append(threading.get_ident())
        time.sleep(0.5)  # the other run asks meanwhile
        return {k: (torch.ones(num_classes, 4), torch.eye(4).repeat(num_classes, 1, 1)) for k in layers}

    monkeypatch.setattr(class_stats, "real_class_stats", slow_stats)
    monkeypatch.setattr(class_stats, "frozen_teacher", lambda cfg, teacher: teacher)
    ctx = stage_ctx(cfg, tmp_path)
    got = []
    runs = [
        threading.Thread(target=lambda: got.append(class_stats.load_class_stats(cfg, ctx, None, ["x"]))) for _ in "ab"
    ]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert len(computed) == 1 and len(got) == 2  # one computed them, the other waited and read them
    assert torch.equal(got[0]["x"][1], got[1]["x"][1])
    (entry,) = (tmp_path / "cache" / "class_stats").iterdir()
    assert (entry / "done.json").is_file() and not (entry / "class_stats.safetensors").stat().st_mode & 0o222


@pytest.mark.parametrize("writer", ["safetensors", "checkpoint"])
def test_a_full_disk_names_the_file_and_leaves_nothing_partial(tmp_path, monkeypatch, writer):
    import errno

    from ddist.runtime import artifacts

    target = tmp_path / ("t.safetensors" if writer == "safetensors" else "c.pt")

    def full(*args, **kwargs):
        out = args[1]  # what a writer leaves when the disk fills (torch.save gets a file handle)
        out.write(b"half") if hasattr(out, "write") else Path(out).write_bytes(b"half")
        if writer == "safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    if writer == "safetensors":
        monkeypatch.setattr(artifacts, "save_file", lambda tensors, path, metadata=None: full(tensors, path))
        with pytest.raises(WriteError) as err:
            artifacts.atomic_save_tensors(target, {"x": torch.zeros(3)})
    else:
        monkeypatch.setattr(torch, "save", full)
        with pytest.raises(WriteError) as err:
            save_checkpoint(target, torch.nn.Linear(2, 2))
    assert f"Could not write {target}" in str(err.value) and "nothing partial was left" in str(err.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_replays_exactly_and_identity_params_change_nothing():
    x = torch.rand(4, 3, 8, 8)
    aug = {"crop_scale": [0.3, 1.0], "flip": True, "crop_draw": "per_image", "roll": 2, "roll_mode": "sre2l"}
    params = sample_params(4, aug, 8, torch.Generator().manual_seed(0))
    assert torch.equal(apply(x, params), apply(x, params))
    identity = {"crop": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4), "flip": torch.zeros(4, dtype=torch.bool)}
    assert torch.allclose(apply(x, identity), x, atol=1e-6)
    assert torch.equal(apply(x, {"flip": torch.ones(4, dtype=torch.bool)}), x.flip(3))
    assert torch.equal(apply(x, {"roll": torch.tensor([1, -2])}), torch.roll(x, (1, -2), (2, 3)))


def test_roll_offsets_follow_the_reference_or_are_symmetric():
    # SRe2L's reference: random.randint(0, lim), inclusive; DeepInversion's: randint(-lim, lim)
    gen = torch.Generator().manual_seed(0)

    def draws(mode):
        aug = {"crop_scale": None, "flip": False, "crop_draw": "per_image", "roll": 3, "roll_mode": mode}
        return torch.stack([sample_params(2, aug, 8, gen)["roll"] for _ in range(400)])

    sre2l = draws("sre2l")
    assert set(sre2l.flatten().tolist()) == {0, 1, 2, 3}
    assert set(draws("symmetric").flatten().tolist()) == set(range(-3, 4))


@pytest.mark.parametrize("crop_draw", ["per_batch", "per_image"])
def test_crop_draw_per_batch_gives_every_image_of_the_batch_one_crop_and_flip(crop_draw):
    # SRe2L's recover calls torchvision's RandomResizedCrop and RandomHorizontalFlip on the batch tensor:
    # one box and one flip for the whole batch. Identical images stay identical under per_batch only.
    aug = {"crop_scale": [0.08, 1.0], "flip": True, "crop_draw": crop_draw, "roll": 0, "roll_mode": "sre2l"}
    x = torch.rand(1, 3, 16, 16).expand(8, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        params = sample_params(8, aug, 16, gen)
        assert params["crop"].shape == (8, 4) and params["flip"].shape == (8,)  # one per image, as stored plans
        out = apply(x, params)
        same = [torch.equal(out[0], out[i]) for i in range(1, 8)]
        assert all(same) if crop_draw == "per_batch" else not any(same)
        assert not torch.allclose(out[0], x[0])  # a box of the image, not the image itself
    flips = torch.stack([sample_params(8, aug, 16, gen)["flip"] for _ in range(200)])
    assert flips.any() and not flips.all()  # still flipped half of the time


def test_crop_draw_per_image_draws_as_before_the_option():
    # per_image keeps the draws of sample_params before crop_draw existed (these values)
    aug = {"crop_scale": [0.3, 1.0], "flip": True, "crop_draw": "per_image", "roll": 2, "roll_mode": "sre2l"}
    params = sample_params(4, aug, 8, torch.Generator().manual_seed(3))
    before = [
        [0.0857, -0.3117, 0.5460, 0.5550],
        [0.3578, -0.0603, 0.5388, 0.6940],
        [-0.0230, -0.3085, 0.7647, 0.6540],
        [0.2362, -0.0384, 0.6057, 0.5265],
    ]
    torch.testing.assert_close(params["crop"], torch.tensor(before), atol=1e-4, rtol=0)
    assert params["flip"].tolist() == [True, False, False, False] and params["roll"].tolist() == [0, 2]


def test_cutmix_pastes_a_box_and_lambda_is_the_kept_area():
    x = torch.zeros(2, 1, 10, 10)
    x[1] = 1.0
    mix = sample_mix(2, "cutmix", 1.0, 10, torch.Generator().manual_seed(1))
    mixed = apply_mix(x, mix)
    y0, y1, x0, x1 = mix["box"].tolist()
    kept = 1 - (y1 - y0) * (x1 - x0) / 100
    assert float(mix["lam"]) == pytest.approx(kept)
    partner = int(mix["perm"][0])
    assert mixed[0].mean().item() == pytest.approx((1 - kept) * float(partner == 1))
    targets = mix_targets(torch.eye(2), mix)
    assert targets.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_batch_plan_is_determined_by_the_seed():
    kwargs = {
        "num_images": 10,
        "batch_size": 4,
        "epochs": 2,
        "aug": {"crop_scale": None, "flip": True, "crop_draw": "per_image", "roll": 0, "roll_mode": "sre2l"},
        "mix": "cutmix",
        "mix_alpha": 1.0,
        "resolution": 8,
    }
    a, b = list(batch_plan(seed=0, **kwargs)), list(batch_plan(seed=0, **kwargs))
    assert len(a) == 6 and all(torch.equal(x["indices"], y["indices"]) for x, y in zip(a, b, strict=False))
    assert sorted(torch.cat([x["indices"] for x in a[:3]]).tolist()) == list(range(10))
    c = list(batch_plan(seed=1, **kwargs))
    assert not all(torch.equal(x["indices"], y["indices"]) for x, y in zip(a, c, strict=False))


# ----------------------------------------------------------------------------- protocol losses


def test_soft_label_loss_is_kl_at_temperature():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    t = 2.0
    p = torch.softmax(teacher / t, 1)[0]
    q = torch.softmax(student / t, 1)[0]
    expected = float((p * (p / q).log()).sum())
    assert soft_label_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert soft_label_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_label_loss_equals_cross_entropy_on_one_hot_and_mixes_linearly():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    assert hard_label_loss(logits, F.one_hot(y, 3).float()).item() == pytest.approx(F.cross_entropy(logits, y).item())
    mixed = 0.3 * F.one_hot(y, 3).float() + 0.7 * F.one_hot(y.flip(0), 3).float()
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, y.flip(0))
    assert hard_label_loss(logits, mixed).item() == pytest.approx(expected.item())


def test_epochs_by_ipc_table():
    table = OmegaConf.create({10: 2000, 50: 1500, "max": 1000})
    assert [epochs_for(table, ipc) for ipc in (1, 10, 11, 50, 100)] == [2000, 2000, 1500, 1500, 1000]
    assert epochs_for(300, 7) == 300
    with pytest.raises(ConfigError, match="max"):
        epochs_for({10: 5}, 11)


def test_cosine_schedule_reaches_zero():
    from ddist.config.compat import typed
    from ddist.config.schema import TeacherConfig
    from ddist.training.loop import make_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_schedule(opt, typed(TeacherConfig, {"schedule": "cosine"}), 10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_the_engine_runs_from_its_start_step_then_the_callbacks_in_order_and_logs_every_n():
    import itertools

    from ddist.training.engine import Callback, Log, Loop, Optim, run_loop

    x = torch.zeros(3, requires_grad=True)
    optim = Optim(torch.optim.SGD([x], lr=0.1), [x])
    events: list = []

    class Spy(Callback):
        def on_step(self, done, loss, parts):
            events.append(("step", done, round(x[0].item(), 6)))  # after the update

        def on_end(self):
            events.append(("end",))

    def step_fn(step, batch):
        events.append(("fn", step))
        return (x - batch).pow(2).sum(), {}

    logged: list[int] = []
    callbacks = [Spy(), Log(3, 7, lambda done, loss, parts: logged.append(done))]
    run_loop(step_fn, itertools.repeat(torch.ones(3)), optim, callbacks, Loop(7, "t", "t", "", start=4, bar=False))
    assert events == [
        ("fn", 4),
        ("step", 5, 0.2),
        ("fn", 5),
        ("step", 6, 0.36),
        ("fn", 6),
        ("step", 7, 0.488),
        ("end",),
    ]
    assert logged == [6, 7]  # every 3 steps and the last


def test_the_engine_stops_at_a_non_finite_loss_naming_the_stage_and_what_to_change():
    from ddist.errors import DivergenceError
    from ddist.training.engine import Loop, Optim, run_loop

    x = torch.zeros(1, requires_grad=True)
    optim = Optim(torch.optim.SGD([x], lr=0.1), [x])
    with pytest.raises(DivergenceError, match="The recover loss became nan at iteration 0. Lower recover.lr."):
        run_loop(
            lambda s, b: (x.sum() * float("nan"), {}), [None], optim, [], Loop(3, "t", "recover", "Lower recover.lr.")
        )


def test_a_checkpoint_saved_twice_is_the_same_file(tmp_path):
    """The student cache keys hash the teacher's file: two saves of one model (through atomic_path's
    random temporary names) must give the same bytes, so a fresh cache finds the same students."""
    from ddist.runtime.artifacts import file_sha256, save_checkpoint

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "a" / "teacher.pt", model, {"epochs": 1})
    save_checkpoint(tmp_path / "b" / "teacher.pt", model, {"epochs": 1})
    assert file_sha256(tmp_path / "a" / "teacher.pt") == file_sha256(tmp_path / "b" / "teacher.pt")
