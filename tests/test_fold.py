"""The BN-folded frozen teacher computes what the unfolded one does, and so do its class statistics."""

import pytest
import torch
from torch import nn

from ddist.models import build_model
from ddist.models.fold import fold_batchnorm
from ddist.objectives import ClassMomentSums
from ddist.training.class_stats import real_class_stats, stats_indices


def eval_model(name: str, channels: int = 3, resolution: int = 16, **kw) -> nn.Module:
    """A random-init model with non-trivial BatchNorm statistics and affine parameters (fresh ones
    are the identity, which a wrong fold would still pass)."""
    torch.manual_seed(0)
    model = build_model({"name": name, **kw}, num_classes=5, channels=channels, resolution=resolution)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval().requires_grad_(False)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal to float tolerance relative to the tensor's scale (float32 rounding of a deep net's
    sums is relative to its largest values, not to each entry)."""
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


MODELS = [("convnet", {"width": 16}), ("resnet18", {}), ("resnet_ap10", {"norm": "batch"}), ("resnet50", {})]


@pytest.mark.parametrize(
    ("name", "kw", "channels_last"),
    [(*MODELS[0], False), (*MODELS[0], True), (*MODELS[1], False), (*MODELS[2], True), (*MODELS[3], False)],
)
def test_folded_model_matches_the_unfolded_one(name, kw, channels_last):
    model = eval_model(name, **kw)
    folded = fold_batchnorm(model, channels_last=channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), "every BatchNorm is folded"
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original is left unchanged"
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    want_logits, want = model.forward_features(x)
    logits, feats = folded.forward_features(x)
    assert_close_to_scale(logits, want_logits)
    for key in want:
        assert_close_to_scale(feats[key], want[key])
    assert list(folded.features(x)) == list(want)


@pytest.mark.parametrize(("name", "kw"), MODELS[:3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_model_input_gradient_matches(name, kw, channels_last):
    """DEDA differentiates through the folded teacher (with in-place ReLUs) to the pixels."""
    model = eval_model(name, **kw)
    folded = fold_batchnorm(model, channels_last=channels_last)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    grads = []
    for net in (model, folded):
        xi = x.clone().requires_grad_(True)
        logits, feats = net.forward_features(xi)
        (logits.square().sum() + sum(f.square().sum() for f in feats.values())).backward()
        grads.append(xi.grad)
    assert_close_to_scale(grads[1], grads[0], 1e-3)


def test_instance_norm_model_is_unchanged_by_folding():
    model = eval_model("convnet", width=8, norm="instance")
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(fold_batchnorm(model)(x), model(x))


@pytest.mark.parametrize(("name", "kw"), [MODELS[0], MODELS[2]])
def test_class_statistics_are_the_same_with_and_without_folding(name, kw):
    model = eval_model(name, **kw)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(30, 3, 16, 16, generator=g)
    labels = torch.arange(3).repeat_interleave(10)
    batches = [(images[i : i + 12], labels[i : i + 12]) for i in range(0, 30, 12)]
    layers = [n for n in model.feature_names if n.startswith("stage")]
    cpu = torch.device("cpu")
    want = real_class_stats(model, batches, 3, layers, cpu)
    got = real_class_stats(fold_batchnorm(model, channels_last=True), batches, 3, layers, cpu)
    for key in layers:
        for part in (0, 1):
            assert_close_to_scale(got[key][part], want[key][part], 1e-3)


# ----------------------------------------------------------------------------- a subset per class


def test_stats_subset_takes_exactly_n_per_class_in_label_order():
    targets = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 2, 2])  # 4, 3, 5 images of classes 0, 1, 2
    idx = stats_indices(targets, 2)
    assert torch.equal(torch.bincount(targets[idx]), torch.tensor([2, 2, 2]))
    assert torch.equal(targets[idx], torch.tensor([0, 0, 1, 1, 2, 2])), "label order"
    assert len(set(idx.tolist())) == 6
    assert torch.equal(stats_indices(targets, 2), idx), "seeded: the same subset every time"
    assert torch.equal(torch.bincount(targets[stats_indices(targets, 4)]), torch.tensor([4, 3, 4])), (
        "a short class gives all it has"
    )
    # null: every image, in the stable label order the statistics always read
    assert torch.equal(stats_indices(targets, None), torch.sort(targets, stable=True).indices)


def test_stats_subset_statistics_equal_those_of_the_subset():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(300, 4, generator=g)
    targets = torch.arange(3).repeat(100)
    idx = stats_indices(targets, 40)
    sums = ClassMomentSums(3, {"f": 4})
    sums.update({"f": feats[idx]}, targets[idx])
    want = ClassMomentSums(3, {"f": 4})
    for c in range(3):
        members = idx[targets[idx] == c]
        assert len(members) == 40
        want.update({"f": feats[members]}, targets[members])
    torch.testing.assert_close(sums.moments()["f"][1], want.moments()["f"][1])


# ----------------------------------------------------------------------------- the options


def test_fold_bn_selects_the_teacher_and_leaves_the_cache_keys(tmp_path):
    from conftest import compose_cfg

    from ddist.training.class_stats import class_stats_key
    from ddist.training.teacher import frozen_teacher, teacher_key

    on = compose_cfg("recover=deda", cache_dir=tmp_path, run_dir=tmp_path)
    off = compose_cfg("recover=deda", "teacher.fold_bn=false", cache_dir=tmp_path, run_dir=tmp_path)
    model = eval_model("convnet", width=8)
    folded = frozen_teacher(on, model)
    assert folded is not model and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs = [m.weight for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    nchw = compose_cfg("recover=deda", "teacher.channels_last=false", cache_dir=tmp_path, run_dir=tmp_path)
    assert all(m.weight.is_contiguous() for m in frozen_teacher(nchw, model).modules() if isinstance(m, nn.Conv2d))
    assert frozen_teacher(off, model) is model
    # the same statistics either way (to float tolerance), so one cache entry serves both
    assert teacher_key(on) == teacher_key(off) == teacher_key(nchw)
    assert class_stats_key(on, ["stage3"]) == class_stats_key(off, ["stage3"])
    # a subset per class is another entry
    subset = compose_cfg(
        "recover=deda", "recover.class_stats.images_per_class=500", cache_dir=tmp_path, run_dir=tmp_path
    )
    assert class_stats_key(on, ["stage3"])["images_per_class"] is None  # every declared field, null too
    assert class_stats_key(subset, ["stage3"])["images_per_class"] == 500
