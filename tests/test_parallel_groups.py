"""recover.batch.parallel_groups: independent SRe2L batches stacked into one problem give the
images each batch gets alone; the stacked objective's statistics are per group."""

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from conftest import stage_ctx as pipeline_ctx
from omegaconf import OmegaConf
from torch import nn

from ddist.config.checks import check_config
from ddist.data import dataset_spec
from ddist.data.augment import apply, apply_groups, sample_params
from ddist.errors import ConfigError
from ddist.models import build_model
from ddist.objectives import SRe2LObjective
from ddist.objectives.bn_matching import batch_moments, group_moments
from ddist.runtime.artifacts import load_distilled, save_checkpoint
from ddist.stages import recover
from ddist.training import recover as recovery

# 10 classes, ipc 3, 4 classes a batch: per IPC index batches of 4, 4 and 2 images (9 groups, two sizes)
SMALL = ["pipeline=sre2l", "ipc=3", "recover.batch.size=4", "recover.iterations=12", "teacher.model.width=16"]


def recover_run(tmp_path: Path, name: str, *overrides: str, cache: str | None = None):
    """The ctx after a recover run on digits with an untrained (fixed) teacher, in its own cache
    (or tmp_path / cache)."""
    run_dir = tmp_path / name
    cfg = compose_cfg(*SMALL, *overrides, cache_dir=tmp_path / (cache or f"{name}-cache"), run_dir=run_dir)
    check_config(cfg)
    spec = dataset_spec(cfg.dataset)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        save_checkpoint(teacher, build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution))
    ctx = pipeline_ctx(cfg, run_dir)
    ctx.teacher, ctx.teacher_acc = teacher, 0.1
    return recover.run(cfg, ctx)


def recovered(tmp_path: Path, name: str, *overrides: str) -> torch.Tensor:
    return load_distilled(recover_run(tmp_path, name, *overrides).require("distilled")).images


@pytest.fixture
def float64():
    """Computation in float64 for the test (the saved sets stay float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("augment", ["roll", "roll+crop", "roll+crop per_image"])
def test_stacked_groups_recover_the_images_of_groups_run_one_at_a_time(augment, tmp_path, float64):
    """In float64: stacked and one-at-a-time runs differ only by rounding, which float32 lifts to ~1e-4 on a
    few pixels of 7680 with one crop box per group (crop_draw per_batch); in float64 the float32 sets agree."""
    extra = ["dataset.augment.recover.crop_scale=[0.5,1.0]"] if "crop" in augment else []
    if "per_image" in augment:
        extra.append("dataset.augment.recover.crop_draw=per_image")
    alone = recovered(tmp_path, "alone", *extra)
    # 2: stacks of two, the last group of each size alone; 9: every group of a size in one stack
    for groups in (2, 9):
        stacked = recovered(tmp_path, f"g{groups}", *extra, f"recover.batch.parallel_groups={groups}")
        torch.testing.assert_close(stacked, alone, atol=1e-6, rtol=0)
    assert alone.abs().sum() > 0


def test_stacked_shards_make_their_own_groups_and_the_last_assembles_the_set(tmp_path):
    alone = recovered(tmp_path, "alone")
    stacked = ["recover.batch.parallel_groups=3", "shard.count=2"]
    first = recover_run(tmp_path, "s0", *stacked, "shard.index=0", cache="shared")
    assert first.stop and first.distilled is None  # groups 0, 2, 4, 6, 8 done; the others missing
    second = recover_run(tmp_path, "s1", *stacked, "shard.index=1", cache="shared")
    torch.testing.assert_close(load_distilled(second.require("distilled")).images, alone, atol=1e-5, rtol=0)


def test_stacks_hold_groups_of_one_size_and_one_at_a_time_keeps_the_order():
    sizes = [4, 4, 2, 4, 4, 2, 4, 4, 2]
    assert recovery.stacks(list(range(9)), sizes, 1) == [[g] for g in range(9)]
    assert recovery.stacks(list(range(9)), sizes, 2) == [[0, 1], [3, 4], [2, 5], [6, 7], [8]]
    assert recovery.stacks([1, 2, 5, 8], sizes, 9) == [[1], [2, 5, 8]]


def small_bn_net() -> nn.Module:
    """Two BatchNorm layers with running statistics far from a fresh layer's."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return net.eval().requires_grad_(False)


def test_the_stacked_objective_is_the_sum_of_each_group_alone():
    objective = SRe2LObjective(small_bn_net(), r_bn=0.5, first_bn_multiplier=10.0, ce_weight=0.7)
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randn(3, 2, 5, 5, generator=generator) * (g + 1) for g in range(3)]  # groups of unlike statistics
    labels = [torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0]), torch.tensor([1, 0, 1])]

    alone, grads_alone = [], []
    for x, y in zip(parts, labels, strict=True):
        x = x.clone().requires_grad_(True)
        loss, _ = objective(x, y, 0, 1)
        loss.backward()
        alone.append(loss.detach())
        grads_alone.append(x.grad)

    x = torch.cat(parts).requires_grad_(True)
    losses, split = objective.per_group(x, torch.cat(labels), 3, 0, 1)
    losses.sum().backward()
    objective.close()

    torch.testing.assert_close(losses.detach(), torch.stack(alone))
    torch.testing.assert_close(0.7 * split["ce"] + 0.5 * split["bn"], losses.detach())
    torch.testing.assert_close(x.grad, torch.cat(grads_alone))  # each group's gradient is its own loss's
    # the statistics are per group: stacking the groups as one batch would give another loss
    assert not torch.allclose(losses.sum(), objective(torch.cat(parts), torch.cat(labels), 0, 1)[0] * 3)


def test_group_moments_are_each_slices_batch_moments():
    x = torch.randn(6, 3, 4, 4) + torch.arange(6.0).view(6, 1, 1, 1)
    mean, var = group_moments(x, 3)
    for g, piece in enumerate(x.chunk(3)):
        torch.testing.assert_close((mean[g], var[g]), batch_moments(piece))


@pytest.mark.parametrize("crop_draw", ["per_image", "per_batch"])
def test_stacked_augmentation_is_each_groups_own(crop_draw):
    aug = {"crop_scale": [0.5, 1.0], "flip": True, "crop_draw": crop_draw, "roll": 2, "roll_mode": "symmetric"}
    x = torch.randn(6, 1, 8, 8)
    params = [sample_params(2, aug, 8, torch.Generator().manual_seed(g)) for g in range(3)]
    alone = torch.cat([apply(piece, p) for piece, p in zip(x.chunk(3), params, strict=True)])
    torch.testing.assert_close(apply_groups(x, params), alone)


@pytest.mark.parametrize("crop_draw", ["per_batch", "per_image"])
def test_per_batch_draws_one_crop_and_flip_per_stacked_group(crop_draw, tmp_path):
    """Stacked groups (ipc_slice batches) are contiguous slices of the leaf, group g at rows g*B..(g+1)*B;
    per_batch gives each group one box and one flip for all its images, as the reference draws for each
    of its batches, and the groups draw their own (from their own generators)."""
    cfg = compose_cfg(
        *SMALL,
        "dataset.augment.recover.crop_scale=[0.3,1.0]",
        "dataset.augment.recover.flip=true",
        f"dataset.augment.recover.crop_draw={crop_draw}",
        "recover.iterations=3",
        cache_dir=tmp_path,
        run_dir=tmp_path,
    )
    augment = OmegaConf.to_container(cfg.dataset.augment.recover)
    seen = []

    class Recorder:
        """per_group of an objective: records the augmented leaf, a loss that reaches every pixel."""

        def per_group(self, x_aug, y, groups, it, iterations):
            seen.append(x_aug.detach().clone())
            return x_aug.reshape(groups, -1).pow(2).mean(1), {}

    groups, size = 3, 4
    image = torch.rand(1, 1, 8, 8)
    x0 = [image.expand(size, 1, 8, 8).clone() for _ in range(groups)]  # every image of every group the same
    labels = [torch.arange(size) for _ in range(groups)]
    generators = [recovery.group_generator(0, g) for g in range(groups)]
    bounds = (torch.full((1, 1, 1, 1), -10.0), torch.full((1, 1, 1, 1), 10.0))
    starts = [recovery.Group(*g) for g in zip(x0, labels, generators, strict=True)]
    space = recovery.PixelSpace(augment, 8, bounds)
    recovery.optimise_groups(Recorder(), starts, cfg.recover, space, lambda *a: None)
    assert len(seen) == 3
    for x_aug in seen[:1]:  # the first step: the images are still identical there
        per_group = x_aug.chunk(groups)
        for g, rows in enumerate(per_group):
            same = [torch.equal(rows[0], rows[i]) for i in range(1, size)]
            assert all(same) if crop_draw == "per_batch" else not any(same), g
        assert not torch.equal(per_group[0][0], per_group[1][0])  # each group its own draw


@pytest.mark.parametrize("value", [0, -1])
def test_a_bad_parallel_groups_names_the_option(value, tmp_path):
    cfg = compose_cfg(*SMALL, f"recover.batch.parallel_groups={value}", cache_dir=tmp_path, run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"recover\.batch\.parallel_groups must be an integer >= 1"):
        check_config(cfg)


def test_parallel_groups_with_deda_is_refused_naming_the_option(tmp_path):
    cfg = compose_cfg("pipeline=deda", "recover.batch.parallel_groups=2", cache_dir=tmp_path, run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"recover\.batch\.parallel_groups=2.*recover\.objective=sre2l"):
        check_config(cfg)
